"""POST /events: clicks into the user's live history in Redis, idempotent by `event_id`."""

from fastapi import APIRouter

from service import pipeline
from service.deps import ServicesDep
from service.errors import error_responses
from service.schemas import EventsRequest, EventsResponse

router = APIRouter(tags=["user state"])


@router.post("/events", responses=error_responses(408, 413, 422, 503))
async def events(req: EventsRequest, svc: ServicesDep) -> EventsResponse:
    """Append clicks (oldest first); the next /recall of the user reads them."""
    return await pipeline.events(svc, req)
