"""What routes receive by injection: the app's `Services`, the served `Runtime`, and the admin check.

Dependencies are async on purpose: FastAPI runs a plain `def` dependency on its thread pool, one thread hop per
request for nothing.
"""

import hmac
from typing import Annotated, NamedTuple

from fastapi import Depends, Header, HTTPException, Request

from service.pipeline import Services
from service.runtime import Runtime


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_runtime(request: Request) -> Runtime:
    """The triple this request is answered by, taken once: a swap mid-request does not change it.

    Reads the app state itself rather than depending on `get_services`: each nested dependency costs FastAPI a
    second resolution pass per request, on the event loop every request shares."""
    svc: Services = request.app.state.services
    rt = svc.holder.current
    if rt is None:
        raise HTTPException(503, detail=f"no model loaded: {svc.holder.not_serving_reason}")
    return rt


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class Serving(NamedTuple):
    svc: Services
    rt: Runtime


async def get_serving(request: Request) -> Serving:
    """Both at once, for /recall and /rank: FastAPI resolves each dependency of a route on every request (a cache
    key, scope checks), on the event loop every request shares, so the hot routes take one."""
    return Serving(request.app.state.services, await get_runtime(request))


ServingDep = Annotated[Serving, Depends(get_serving)]


async def require_admin(
    svc: ServicesDep, x_quiver_admin_token: Annotated[str | None, Header(description="QUIVER_ADMIN_TOKEN")] = None
) -> None:
    expected = svc.settings.admin_token
    if expected is None:
        raise HTTPException(403, detail="admin is disabled: set QUIVER_ADMIN_TOKEN")
    if x_quiver_admin_token is None:
        raise HTTPException(401, detail="missing X-Quiver-Admin-Token header")
    if not hmac.compare_digest(x_quiver_admin_token.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, detail="wrong X-Quiver-Admin-Token")
