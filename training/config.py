"""The training config: one YAML file, validated by pydantic before anything runs.

A wrong key or type is reported with its dotted path (`train.lr: Input should be a valid number`), never a traceback.
"""

from pathlib import Path
from typing import Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import QuiverError
from models.features import FeatureGroups
from models.mind import MINDConfig
from models.registry import ModelConfig
from models.sequence import SequenceConfig, reads_time
from training.data.config import DataConfig

ConfigT = TypeVar("ConfigT", bound=BaseModel)

MODEL_TYPES = (
    "dssm",
    "dat",
    "mind",
    "sasrec",
    "hstu",
    "tdm",
)  # tdm: the reranker, its own config (training/tdm_config.py)


class NegativeConfig(BaseModel):
    """in_batch: the other rows' positives are the negatives. sampled: `num` items per batch drawn from the
    catalog by popularity^alpha (alpha 0 = uniform), excluding the batch's positives (the sequence models draw from
    the whole catalog and mask a row's own target). mixed: both, one (R, R + num) matrix. full: the whole catalog
    (a full softmax; for catalogs small enough that R x items logits fit a step)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["in_batch", "sampled", "mixed", "full"] = "sampled"
    num: int = Field(default=1024, ge=1)
    alpha: float = Field(default=0.75, ge=0.0)
    log_q: bool = True


class HardNegativeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_hard: int = Field(default=0, ge=0)  # per training row; 0 = off
    # exposures: a user_id,item_id file of items shown but not clicked; category: the positive's category.
    source: Literal["exposures", "category"] | None = None
    exposures: str | None = None  # file name, relative to data.path when not absolute
    category_column: str = "category"  # item-table column that defines "the same category"

    @model_validator(mode="after")
    def _needs_file(self) -> Self:
        if self.num_hard > 0 and self.source is None:
            raise ValueError("hard_negative.source: required when num_hard > 0 ('exposures' or 'category')")
        if self.source == "exposures" and self.num_hard > 0 and not self.exposures:
            raise ValueError("hard_negative.exposures: source 'exposures' needs a user_id,item_id file")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=1024, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "adagrad"] = "adam"
    # onecycle: warm up to `lr` over the first 10% of steps, then anneal (cosine) towards zero by the last epoch.
    lr_schedule: Literal["constant", "onecycle"] = "constant"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(default=1, ge=1)  # torch intra-op threads per process (oversubscription is slow)
    recall_k: int = Field(default=10, ge=1)  # the in-batch training metric shown in the progress bar
    # bf16: each step's forward runs under torch.autocast, so the matrix products (the towers' Linear layers and the
    # (R, C) logits) take bfloat16 inputs while the softmax, the loss and the weights stay float32. 1.5x the rows/s
    # of the ML-1M default on an AVX512-BF16 CPU (bench/train_speed.py --precision; AMX CPUs and GPUs gain too); far
    # slower on a CPU without bfloat16 instructions. Evaluation and
    # serving stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Picks the best epoch on the validation split: full ranking (Recall@20), or with a negatives file the sampled
    # protocol (sampled_HR@10), validation negatives drawn like the test ones.
    valid_metric: str = "Recall@20"
    valid_users: int = Field(default=5000, ge=1)  # validation subsample, for speed
    # loss = softmax + bpr_weight x a pairwise (BPR) term of each row's label against bpr_negatives of its columns
    # drawn uniformly (models/similarity.py bpr_loss); 0 = softmax only
    bpr_weight: float = Field(default=0.0, ge=0)
    bpr_negatives: int = Field(default=16, ge=1)
    max_minutes: float | None = Field(default=None, gt=0)  # stop after the epoch that crosses this budget
    patience: int | None = Field(default=None, ge=1)  # stop after this many epochs without a better validation score
    progress: bool = True


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = "artifacts/models"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # item-table columns /recall may filter on (models/attributes.py); None: every comparable attribute column
    filterable: list[str] | None = None


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ks: list[int] = Field(default_factory=lambda: [10, 20, 50, 100])
    sampled_k: int = Field(default=10, ge=1)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataConfig
    features: FeatureGroups
    model: ModelConfig
    negatives: NegativeConfig = Field(default_factory=NegativeConfig)
    hard_negative: HardNegativeConfig = Field(default_factory=HardNegativeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        metric, _, k = self.train.valid_metric.removeprefix("sampled_").partition("@")
        if metric not in ("Recall", "HR", "NDCG") or not k.isdigit() or int(k) < 1:
            raise ValueError(
                "train.valid_metric: expected Recall@K, HR@K, NDCG@K (full ranking) or sampled_HR@K, sampled_NDCG@K "
                f"(the negatives-file protocol), got {self.train.valid_metric!r}"
            )
        if isinstance(self.model, MINDConfig):
            longest = max(self.data.max_seq_len, self.data.query_seq_len or 0)
            if longest > self.model.max_seq_len:
                raise ValueError(
                    f"model.max_seq_len: {self.model.max_seq_len} is shorter than the histories the data section "
                    f"builds ({longest}, data.max_seq_len / data.query_seq_len)"
                )
        if isinstance(self.model, SequenceConfig):
            self._sequence_checks(self.model)
        if self.hard_negative.num_hard and self.negatives.mode == "full":
            raise ValueError("hard_negative.num_hard: with negatives.mode full every item is a negative already")
        if any(k < 1 for k in self.eval.ks):
            raise ValueError("eval.ks: every K must be >= 1")
        return self

    def _sequence_checks(self, model: SequenceConfig) -> None:
        """What a sequence model needs of the rest of the config, refused before any data is read."""
        kind = model.type  # type: ignore[attr-defined]
        if self.data.history == "others":
            raise ValueError(
                f"data.history: a {kind} model reads the order of the history, and 'others' data has none "
                "(use a pooled model such as dssm)"
            )
        longest = max(self.data.max_seq_len, self.data.query_seq_len or 0)
        if longest > model.max_seq_len:
            raise ValueError(
                f"model.max_seq_len: {model.max_seq_len} is shorter than the histories the data section builds "
                f"({longest}, data.max_seq_len / data.query_seq_len)"
            )
        if self.data.max_seq_len < 2:
            raise ValueError(
                f"data.max_seq_len: a {kind} model needs at least 2 positions, got {self.data.max_seq_len}"
            )
        if self.hard_negative.num_hard:
            raise ValueError(f"hard_negative.num_hard: the {kind} model trains on every position; no hard negatives")
        if self.features.user:
            raise ValueError(f"features.user: a {kind} model's user tower reads the history alone (no user features)")
        if len(self.features.hist) != 1 or self.features.hist[0].shared_with is None:
            raise ValueError(
                f"features.hist: a {kind} model reads one sequence feature that shares the item id table "
                "(shared_with: item_id)"
            )
        if reads_time(model) and self.data.format == "sequence_lines":
            raise ValueError(
                "model.time_buckets: sequence-line files carry no clock (their timestamps are positions); set it to 0"
            )
        width = self.features.hist[0].embedding_dim
        if width % model.num_heads:
            raise ValueError(f"model.num_heads: {model.num_heads} does not divide the sequence width {width}")


def format_validation_error(err: ValidationError, source: str) -> str:
    """All problems on one line, each with its dotted key path."""
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] == "model" and isinstance(loc[1], str) and loc[1] in MODEL_TYPES:
            del loc[1]  # the discriminated union's tag is not a key of the YAML file
        path = ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))
        parts.append(f"{path}: {e['msg']}" if path else e["msg"])
    return f"{source}: invalid config: " + "; ".join(parts)


def validated(cls: type[ConfigT], data: object, source: str) -> ConfigT:
    """Validate a config mapping against a config class; every problem on one line (QuiverError)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise QuiverError(format_validation_error(err, source)) from None


def parse_config(data: object, source: str) -> Config:
    return validated(Config, data, source)


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping; a missing file or bad YAML is one line naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise QuiverError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise QuiverError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise QuiverError(f"{path}: expected a mapping of config sections at the top level")
    return data


def load_config(path: str | Path) -> Config:
    return parse_config(read_yaml(path), str(path))
