"""Service settings: every knob is a `QUIVER_*` environment variable (the README lists them all).

Read once at start-up; a test or a benchmark builds `Settings(...)` directly and hands it to `create_app`.
"""

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cpus import parse_cpus
from service.sched_slice import MAX_US, MIN_US

BATCH_CAP_PROCESS = 8  # QUIVER_BATCH_MAX_SIZE's default with the model process (Settings.batch_cap says why)
BATCH_CAP_THREAD = 64  # and on the model thread


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUIVER_", extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="root holding models/ and indexes/")
    model: str = Field("dssm_demo", description="retriever bundle name under artifacts/models")
    index: str | None = Field(None, description="index name under artifacts/indexes (default: the model's name)")
    ranker: str | None = Field(None, description="TDM bundle name for rerank and /rank (unset: both answer 503)")

    redis_url: str | None = Field(None, description="user state store; unset: the model bundle's own tables")
    redis_timeout_ms: float = Field(50.0, gt=0, description="per Redis call; past it the request is served degraded")
    redis_pool_size: int = Field(64, ge=1)
    redis_breaker_failures: int = Field(
        5, ge=1, description="consecutive failed or timed-out Redis calls that open the circuit breaker"
    )
    redis_breaker_open_s: float = Field(
        0.1, gt=0, description="an open breaker serves degraded without calling Redis this long, then probes once"
    )
    state_ttl_s: int = Field(
        2_592_000, ge=0, description="user history/profile keys expire this long after their last write; 0 = never"
    )
    event_id_window_s: int = Field(86_400, ge=1, description="how long an /events event_id is remembered for retries")
    event_id_max: int = Field(10_000, ge=1, description="event_ids remembered per user at most (the oldest go first)")

    admin_token: SecretStr | None = Field(None, description="X-Quiver-Admin-Token for /admin/*; unset: admin is off")
    reload_poll_s: float = Field(30.0, ge=0, description="check CURRENT/LATEST for new versions; 0 = only on demand")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    log_level: str = "info"

    # One by default: the model thread's micro-batches are small, and each extra OpenMP thread spins on the core the
    # event loop needs (bench/README "serve.py": p99 at half load 19 ms with 2 threads, 8 ms with 1, on 2 cores).
    # More throughput per machine comes from QUIVER_WORKERS, one process per core.
    torch_threads: int = Field(1, ge=1, description="torch and FAISS threads of the model thread")
    model_process: bool = Field(
        False,
        description="run /recall's user tower and index search in a process of their own (off the HTTP process's GIL)",
    )
    model_cpus: str = Field(
        "",
        description="CPUs of the model process: '' free, 'auto' (its own QUIVER_TORCH_THREADS CPUs, the HTTP process "
        "the rest), or a list such as '3' or '2-3' (service/cpus.py)",
    )
    sched_slice_us: int = Field(
        100,
        ge=0,
        le=MAX_US,
        description="scheduler time slice of the service's threads and its model process, in µs (Linux 6.12+; "
        "0: the kernel's default): a short one lets a woken request run soon on a busy CPU (service/sched_slice.py)",
    )
    microbatch: bool = Field(True, description="batch concurrent /recall requests into one tower pass and search")
    batch_max_size: int | None = Field(
        None,
        ge=1,
        description="requests per micro-batch at most; unset: 8 with QUIVER_MODEL_PROCESS, 64 on the model thread "
        "(`batch_cap`)",
    )
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="extra wait for a batch to fill; 0: a batch is what queued while the last one ran"
    )

    rerank_candidates: int = Field(200, ge=1, le=1000, description="retrieved candidates TDM reorders on rerank")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        10.0, gt=0, description="a body not complete this long after its headers gets 408 and a closed connection"
    )
    docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (false: all three are 404)")

    @field_validator("model_cpus")
    @classmethod
    def _cpus(cls, value: str) -> str:
        parse_cpus(value)  # its ValueError names the bad part; pydantic adds the field
        return value.strip()

    @field_validator("sched_slice_us")
    @classmethod
    def _slice(cls, value: int) -> int:
        if 0 < value < MIN_US:
            raise ValueError(f"the kernel's shortest slice is {MIN_US} µs; 0 keeps its default")
        return value

    @model_validator(mode="after")
    def _names(self) -> Self:
        if not self.model.strip():
            raise ValueError("QUIVER_MODEL: empty bundle name")
        if self.admin_token is not None and not self.admin_token.get_secret_value().strip():
            self.admin_token = None  # an empty token (compose's `${VAR:-}`) turns admin off, never matches ""
        return self

    @property
    def batch_cap(self) -> int:
        """The micro-batch's size limit. With the model process the HTTP process and the child work as two stages,
        and they overlap only while a batch leaves requests for the other stage: at 32 concurrent requests, batches
        of up to 64 let every request travel in one or two convoys, so each process sat idle while the other worked
        (server CPU 106-131% of 200 in some runs). Capped at 8, both stay busy (~177%): in interleaved saturation
        runs on the serve bench, 64 gave 2,824-4,790 req/s (6 of 8 runs under 4,000) and 8 gave 3,924-4,917 (6 of 8
        over 4,600); 4 lost more to per-batch costs than it gained (bench/README "serve.py"). On the model thread
        the GIL serialises the two anyway, and 64 beat 8 (2,500-2,800 vs 2,200-2,500 req/s)."""
        if self.batch_max_size is not None:
            return self.batch_max_size
        return BATCH_CAP_PROCESS if self.model_process else BATCH_CAP_THREAD

    @property
    def index_name(self) -> str:
        return self.index or self.model

    @property
    def models_root(self) -> Path:
        return self.artifacts / "models"

    @property
    def indexes_root(self) -> Path:
        return self.artifacts / "indexes"
