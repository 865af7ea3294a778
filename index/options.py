"""The settings `quiver-index` build, add and rebuild take, as values: one object travels from the command line to
the code that reads it instead of a dozen keywords re-passed at every hop.

What a full build makes (`BuildOptions`, hashed into the index version) is kept apart from how the work runs
(`RunOptions`, which an upsert shares) and from how the result is published (`PublishOptions`).
"""

from dataclasses import dataclass, field

DEFAULT_FACTORY = "HNSW32,Flat"  # `build`'s
DEFAULT_REBUILD = "auto"  # `rebuild`'s, when no index is published yet (index/auto.py)
DEFAULT_FLOOR = 0.95
DEFAULT_K = 100
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class RunOptions:
    """How a build or an upsert runs; none of it changes the index it publishes."""

    allow_low_recall: bool = False  # publish even below the recall floor
    batch: int = 8192  # items per item-tower batch
    threads: int | None = None  # FAISS and ScaNN threads (None: all cores)
    progress: bool = False


@dataclass(frozen=True)
class BuildOptions:
    """A full build: everything but `run` and `gpu` decides the index, so it goes into the version hash."""

    factory: str | None = None  # a layout, "auto" or "scann"; None: DEFAULT_FACTORY (rebuild: the current index's)
    # the index's own search knobs (nprobe | efSearch | leaves_to_search, reorder); None: tuned to the floor
    search: dict[str, int] | None = None
    ef_construction: int | None = None  # HNSW build breadth; None: the default (rebuild: the current index's)
    floor: float = DEFAULT_FLOOR  # minimum recall@k against exact search
    k: int = DEFAULT_K
    num_queries: int = 1000  # users sampled to measure recall
    seed: int = 0
    gpu: bool | None = None  # train IVF/PQ on a GPU; None: when FAISS has one
    run: RunOptions = field(default_factory=RunOptions)


@dataclass(frozen=True)
class PublishOptions:
    """What happens around a publish: versions kept (never the CURRENT one) and the Redis announcement."""

    keep: int = DEFAULT_KEEP
    redis_url: str | None = None
