"""GET /models: the served bundles by name and version (never their paths on disk) and the last refused reload."""

from fastapi import APIRouter

from service.deps import RuntimeDep, ServicesDep
from service.errors import error_responses
from service.schemas import BundleInfo, IndexInfo, Loaded, ModelInfo

router = APIRouter(tags=["operations"])


@router.get("/models", responses=error_responses(503))
async def models(svc: ServicesDep, rt: RuntimeDep) -> Loaded:
    idx = rt.index.manifest
    ranker = None
    if rt.ranker is not None:
        b = rt.ranker.bundle
        ranker = BundleInfo.model_construct(name=b.name, version=b.version, type=b.manifest.get("model_type"))
    return Loaded.model_construct(
        model=ModelInfo.model_construct(
            name=rt.model.name,
            version=rt.model.version,
            type=rt.model.manifest.get("model_type"),
            similarity=rt.model.manifest.get("similarity"),
        ),
        index=IndexInfo.model_construct(
            name=rt.index.name,
            version=rt.index.version,
            type=idx["index"].get("type"),
            factory=idx["index"].get("factory"),
            metric=idx["metric"],
            num_items=int(rt.index.index.ntotal),
            recall=idx.get("quality"),
            filterable=dict(rt.attributes.kinds),
        ),
        ranker=ranker,
        loaded_at=rt.loaded_at,
        last_refusal=svc.holder.refusal,
    )
