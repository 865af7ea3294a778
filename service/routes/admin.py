"""POST /admin/reload: load the newest published triple now (token in X-Quiver-Admin-Token)."""

from fastapi import APIRouter, Depends, Response

from service.deps import ServicesDep, require_admin
from service.errors import error_responses
from service.reload import announce
from service.schemas import ReloadResponse

router = APIRouter(prefix="/admin", tags=["operations"], dependencies=[Depends(require_admin)])


@router.post(
    "/reload",
    responses={
        **error_responses(401, 403, 422),
        409: {"model": ReloadResponse, "description": "refused: the old triple keeps serving; `reason` says why"},
    },
)
async def reload(svc: ServicesDep, response: Response, force: bool = False) -> ReloadResponse:
    """200 `reloaded` or `unchanged`; 409 `refused` for a newest triple that cannot be served, whether this call or
    a background reload tried it first."""
    outcome = await svc.holder.reload(force=force)
    model, index, ranker = outcome.versions or (None, None, None)
    if outcome.status == "refused":
        response.status_code = 409
    elif outcome.status == "reloaded" and outcome.versions is not None:
        await announce(svc.holder, outcome.versions)  # the other worker processes load the same triple
    return ReloadResponse.model_construct(
        status=outcome.status, model_version=model, index_version=index, ranker_version=ranker, reason=outcome.reason
    )
