"""POST /recall (DESIGN §7); the flow lives in service/pipeline.py."""

from fastapi import APIRouter

from service import pipeline
from service.deps import ServingDep
from service.errors import error_responses
from service.lean_route import LeanRoute
from service.responses import JSON
from service.schemas import RecallRequest, RecallResponse

router = APIRouter(tags=["retrieval"], route_class=LeanRoute)


@router.post("/recall", response_model=RecallResponse, responses=error_responses(404, 408, 413, 422, 503))
async def recall(req: RecallRequest, serving: ServingDep) -> JSON:
    """The user's top-k items from the index, optionally reordered by the TDM ranker (`rerank`)."""
    return JSON(await pipeline.recall(serving.svc, serving.rt, req))  # a RecallResponse body
