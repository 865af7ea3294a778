"""GET /healthz (the process answers) and GET /readyz (bundles loaded; Redis reachable or not configured)."""

from fastapi import APIRouter, Response

from service.deps import ServicesDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Health:
    return Health.model_construct(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness, "description": "not ready: no model loaded yet"}})
async def readyz(svc: ServicesDep, response: Response) -> Readiness:
    rt = svc.holder.current
    breaker = None
    if svc.store is None:
        redis = "not_configured"
    else:
        redis = "ok" if await svc.store.ping() else "degraded"
        breaker = svc.store.breaker.state
    refusal = svc.holder.refusal
    if rt is None:
        reason = svc.holder.not_serving_reason
        response.status_code = 503
        return Readiness.model_construct(
            ready=False, redis=redis, redis_breaker=breaker, reason=reason, last_refusal=refusal
        )
    model, index, ranker = rt.versions
    return Readiness.model_construct(
        ready=True,
        redis=redis,
        redis_breaker=breaker,
        model_version=model,
        index_version=index,
        ranker_version=ranker,
        last_refusal=refusal,
    )
