"""GET /users/{user_id}: a read-only debug view of the user state the next /recall of that user reads."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from service import inspect
from service.deps import RuntimeDep, ServicesDep
from service.errors import error_responses
from service.schemas import ErrorBody, UserView

router = APIRouter(tags=["debug"])

UserId = Annotated[str, Path(min_length=1, max_length=256, description="the user id (may contain '/')")]


@router.get(
    "/users/{user_id:path}",
    responses={
        **error_responses(422, 503),
        404: {"model": ErrorBody, "description": "no Redis record and not in the model bundle's users table"},
    },
)
async def user(user_id: UserId, svc: ServicesDep, rt: RuntimeDep) -> UserView:
    """Resolved history (and its source), profile and degraded reasons, as a /recall without `history` or `features`
    would read them now. Reads Redis, never writes it. With Redis unavailable the view answers from the bundle,
    flagged `redis_unavailable` (a user the bundle lacks then shows what /recall serves them: the popularity
    fallback), rather than failing or calling the user unknown."""
    view = await inspect.user_view(rt, svc.store, user_id)
    if view is None:
        raise HTTPException(
            404, detail=f"user {user_id!r}: no state in Redis nor in model {rt.model.name}'s users table"
        )
    return view
