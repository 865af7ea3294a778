"""One APIRouter per resource; `api_router` gathers them for create_app."""

from fastapi import APIRouter
from fastapi.routing import APIRoute

from service.routes import admin, events, health, items, metrics, models, rank, recall, users

ROUTERS = tuple(module.router for module in (recall, rank, events, items, users, health, models, admin, metrics))

api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)


def paths() -> set[str]:
    """The served paths (FastAPI includes routers lazily, so the app's own route list does not show them)."""
    return {route.path for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)}
