"""Where the data lives, which reader parses it, and how it is split for offline evaluation."""

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """The `data:` section of a training config.

    `path` is a directory (file names below are relative to it) or, for the single-file formats, the train file
    itself (file names are then relative to its folder). Relative paths resolve against the working directory.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["interactions", "sequence_lines", "ml1m", "recbole", "taobao"]
    path: str
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    users: str | None = None
    items: str | None = None
    negatives: str | None = None
    # leave_last_out: each user's last event is test, the second last valid. explicit: test comes from a file.
    split: Literal["leave_last_out", "explicit"] = "leave_last_out"
    # With an explicit split and no valid file: "last" holds out each user's last training event as validation.
    validation: Literal["last", "none"] = "last"
    seed: int = 0
    max_seq_len: int = Field(default=50, ge=1)
    # How an event's history is built.
    #   before: the same user's events with a strictly earlier timestamp (no leakage); needs real timestamps.
    #   others: for data with no order inside the training split (ML-1M NCF train.tsv has no timestamps): each step
    #     draws, per training event, a fresh random sample of max_seq_len of the user's *other* training events (never
    #     the event itself); an evaluation query sees a random sample of the user's events outside the held-out split.
    #     The held-out (validation / test) items never enter any history.
    history: Literal["before", "others"] = "before"
    # History length of evaluation queries and of the serving state in the bundle (default: max_seq_len).
    query_seq_len: int | None = Field(default=None, ge=1)
    # taobao: keep only these behavior types (pv, buy, cart, fav); None keeps all.
    behaviors: list[str] | None = None

    @model_validator(mode="after")
    def _split_has_sources(self) -> Self:
        # ML-1M's test source can be its published NCF split (test.tsv), found on disk at load time.
        if self.split == "explicit" and self.test is None and self.format != "ml1m":
            raise ValueError("data.test: split 'explicit' needs a test file (set data.test)")
        if self.split == "leave_last_out" and self.format != "ml1m":
            for key in ("test", "valid"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"data.{key}: a {key} file is only read with split 'explicit' (set data.split: explicit)"
                    )
        if self.behaviors is not None and self.format != "taobao":
            raise ValueError("data.behaviors: only the taobao format has behavior types")
        return self
