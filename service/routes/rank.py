"""POST /rank (DESIGN §7); the flow lives in service/pipeline.py."""

from fastapi import APIRouter

from service import pipeline
from service.deps import ServingDep
from service.errors import error_responses
from service.lean_route import LeanRoute
from service.responses import JSON
from service.schemas import RankRequest, RankResponse

router = APIRouter(tags=["retrieval"], route_class=LeanRoute)


@router.post("/rank", response_model=RankResponse, responses=error_responses(408, 413, 422, 503))
async def rank(req: RankRequest, serving: ServingDep) -> JSON:
    """The given candidates in the TDM ranker's order (unknown ids reported, not scored)."""
    return JSON(await pipeline.rank(serving.svc, serving.rt, req))  # a RankResponse body
