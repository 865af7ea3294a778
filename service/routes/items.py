"""GET /items/{item_id}: a read-only debug view of one item in the served triple (catalog, popularity, index)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from service import inspect
from service.deps import RuntimeDep
from service.errors import error_responses
from service.schemas import ErrorBody, ItemView

router = APIRouter(tags=["debug"])

ItemId = Annotated[str, Path(min_length=1, max_length=256, description="the item id (may contain '/')")]


@router.get(
    "/items/{item_id:path}",
    responses={
        **error_responses(422, 503),
        404: {"model": ErrorBody, "description": "neither the served index nor the model's catalog has the item"},
    },
)
async def item(item_id: ItemId, rt: RuntimeDep) -> ItemView:
    """Its catalog attributes and training popularity, and whether the served index (and ranker) hold it.

    The catalog scan runs off the event loop: it is a vectorised pass over the whole catalog."""
    view = await asyncio.to_thread(inspect.item_view, rt, item_id)
    if view is None:
        raise HTTPException(
            404, detail=f"item {item_id!r}: not in the served index nor in model {rt.model.name}'s catalog"
        )
    return view
