"""What one served version is: a retriever bundle, the index built from it, and optionally a TDM ranker.

The service holds exactly one `Runtime` at a time and swaps it whole (service/reload.py); a request takes the
reference once and does all its work on that object, so no answer mixes versions. The index's CURRENT pointer
decides the pair: it names the model version the index was built from, and that version of the model is loaded,
even if the model's LATEST has moved on (its index is not built yet). The ranker is its bundle's LATEST.

Everything here is synchronous and CPU-bound; the app runs it on its model thread, never on the event loop.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from index.bundle import IndexBundle, load_index, read_index_manifest, resolve_index
from index.filter import Attributes, Filter, Passing
from index.search import search_vectors
from models.attributes import recorded_filterable
from models.bundle import ModelBundle, load_bundle, read_manifest, resolve_bundle
from models.errors import QuiverError
from models.inputs import history_length, to_batch
from models.numpy_tower import NumpyTower
from models.rank import Ranker, retriever_model
from models.sequence import reads_time
from service.schemas import ScoredItem
from service.settings import Settings
from service.tower_inputs import TowerInputEncoder, TowerInputs
from service.userstate import BundleUsers, UserState


@dataclass(frozen=True)
class Target:
    """The folders of one (model, index, ranker) triple and their versions."""

    model: Path
    index: Path
    ranker: Path | None
    versions: tuple[str, str, str | None]  # model, index, ranker


def find_target(settings: Settings) -> Target:
    """The newest published triple whose versions pair up, from the pointers on disk (no weights read)."""
    index_dir = resolve_index(settings.indexes_root / settings.index_name)
    manifest = read_index_manifest(index_dir)
    name, version = str(manifest["model"]["name"]), str(manifest["model"]["version"])
    if name != settings.model:
        raise QuiverError(f"{index_dir}: built from model {name!r}, but QUIVER_MODEL is {settings.model!r}")
    model_dir = settings.models_root / name / version
    if not model_dir.is_dir():
        raise QuiverError(f"{index_dir}: built from model version {version}, which {model_dir} does not hold")
    ranker_dir, ranker_version = None, None
    if settings.ranker:
        ranker_dir = resolve_bundle(settings.models_root / settings.ranker)
        ranker_version = str(read_manifest(ranker_dir)["version"])
    return Target(model_dir, index_dir, ranker_dir, (version, str(manifest["version"]), ranker_version))


@dataclass
class RecallJob:
    state: UserState
    fetch: int  # how many items to retrieve (k, or the rerank depth)
    exclude: list[str]  # item ids to leave out
    filter: Filter | None = None  # attributes every item must have (parsed by Runtime.attributes.parse)
    render: bool = False  # the answer's items as JSON will do (no rerank): the model process then renders them


class Found(NamedTuple):
    """One job's retrieved items, best first, as plain lists (they go straight into the JSON answer)."""

    item_ids: list[str]
    scores: list[float]
    interests: list[int]  # which interest vector found each item (0 for single-vector models)

    def items(self) -> list[ScoredItem]:
        """The `items` of a /recall answer without rerank."""
        return [{"item_id": i, "score": s, "interest": t} for i, s, t in zip(*self, strict=True)]


@dataclass
class BatchTimings:
    user_tower: float = 0.0
    search: float = 0.0


class Runtime:
    def __init__(self, model: ModelBundle, index: IndexBundle, ranker: Ranker | None) -> None:
        self.model = model
        self.retriever = retriever_model(model).eval()
        self.reads_time = reads_time(getattr(self.retriever, "cfg", None))  # HSTU time buckets: history times too
        on_cpu = all(p.device.type == "cpu" for p in self.retriever.parameters())
        self.small_tower = NumpyTower.compile(self.retriever) if on_cpu else None  # few-row batches, torch's maths
        self.index = index
        self.ranker = ranker
        self.loaded_at = time.time()
        user_cols = [f.source for f in model.encoder.groups.user]
        self.users = BundleUsers(model.users, user_cols)
        self.ranker_users = BundleUsers(ranker.bundle.users, ranker.user_columns) if ranker else None
        self.history_len = history_length(model)  # L of the user tower
        self.state_len = max(self.history_len, ranker.history_len if ranker else 0)  # history any stage reads
        self.rows = index.row_of()  # item id -> index label
        self.inputs = TowerInputEncoder(
            model.encoder, self.users, self.rows, len(index.ids), self.history_len, self.reads_time
        )
        self.searcher = index.searcher  # built once: FAISS's wrapper looks its index up again on every build
        self._popular_order, self._popular_score = self._popularity()
        self.attributes = self._attributes()

    @property
    def versions(self) -> tuple[str, str, str | None]:
        return self.model.version, self.index.version, self.ranker.bundle.version if self.ranker else None

    def _popularity(self) -> tuple[np.ndarray, np.ndarray]:
        """Index labels by training popularity, most popular first (items added after training count 0)."""
        items = self.model.items
        pop = dict.fromkeys(self.index.ids.tolist(), 0.0)
        if "popularity" in items.column_names:
            for i, p in zip(items["item_id"].to_pylist(), items["popularity"].to_pylist(), strict=True):
                if str(i) in pop:
                    pop[str(i)] = float(p or 0)
        score = np.fromiter(pop.values(), dtype=np.float64, count=len(pop))
        order = np.argsort(-score, kind="stable")
        return order, score[order].astype(np.float32)

    def _attributes(self) -> Attributes:
        """The served items' filterable attributes: the index bundle's own (kept current by upserts), else, for an
        index built before filters, the model catalog's, looked up by item id (an item it lacks passes no filter)."""
        if self.index.attributes is not None:
            return Attributes(self.index.attributes, self.index.attribute_kinds)
        items = self.model.items
        kinds = recorded_filterable(self.model.manifest, items)
        where = {str(i): r for r, i in enumerate(items.column("item_id").to_pylist())}
        take = pa.array([where.get(i) for i in self.index.ids.tolist()], type=pa.int64())
        return Attributes(items.select(list(kinds)).take(take), kinds)

    def passing(self, flt: Filter) -> Passing:
        return self.attributes.passing(flt, self.index.index, self.index.dim)

    def split_known(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Item ids in the index's catalog, and the rest (reported to the caller, never silently dropped)."""
        known, unknown = [], []
        for i in item_ids:
            (known if i in self.rows else unknown).append(i)
        return known, unknown

    def labels(self, item_ids: Sequence[str]) -> list[int]:
        rows = self.rows
        return [r for i in item_ids if (r := rows.get(i)) is not None]

    def excluded(self, job: RecallJob) -> list[int]:
        return self.labels(job.exclude)

    def popular(self, fetch: int, excluded: Sequence[int], passing: Passing | None = None) -> Found:
        """The most popular items not excluded (and passing the filter): the answer for a user nobody knows."""
        order, score = self._popular_order, self._popular_score
        if passing is not None:
            keep = passing.mask[order]
            order, score = order[keep], score[keep]
        head = order[: fetch + len(excluded)]  # enough even if every excluded item is in it
        keep = ~np.isin(head, np.asarray(excluded, dtype=np.int64))
        labels, scores = head[keep][:fetch], score[: len(head)][keep][:fetch]
        return Found(self.index.ids[labels].tolist(), scores.tolist(), [0] * len(labels))

    def tower_inputs(self, states: Sequence[UserState]) -> TowerInputs:
        """The user tower's encoded features for a batch of states: profile codes, (B, L) history codes (and times
        for a time-reading model). Pure lookups and hashing, no weights: with the model process, its HTTP side
        encodes the profiles (`profile_inputs`) and the child the histories."""
        return self.inputs.encode(states)

    def tower(self, feats: TowerInputs) -> tuple[np.ndarray, np.ndarray]:
        """(B, K, D) float32 interest vectors and their (B, K) mask, one tower pass for the whole batch. A batch of
        a few rows goes through the numpy copy of the tower where the model has one (models/numpy_tower.py): the
        same maths without torch's per-op dispatch, which is most of a small batch's cost."""
        if self.small_tower is not None and len(next(iter(feats.values()))) <= self.small_tower.max_rows:
            return self.small_tower(feats)  # no torch op: torch's inference mode is not entered either
        with torch.inference_mode():
            vectors, mask = self.retriever.interests(to_batch(feats, slice(None), torch.device("cpu")))
            return vectors.float().numpy(), mask.numpy()

    def user_vectors(self, states: Sequence[UserState]) -> tuple[np.ndarray, np.ndarray]:
        return self.tower(self.tower_inputs(states))

    def profile_inputs(self, jobs: Sequence[RecallJob]) -> TowerInputs | None:
        """The user group's part of the tower inputs `recall` reads: the personalised jobs' (not popularity-only), in
        job order; None if no job is personalised. The model process's HTTP side encodes these (from the profile
        memo, whose rows live there); the child adds the histories' (`inputs.histories`)."""
        states = [job.state for job in jobs if not job.state.popularity_only]
        return self.inputs.profiles(states) if states else None

    def recall(self, jobs: Sequence[RecallJob], inputs: TowerInputs | None = None) -> tuple[list[Found], BatchTimings]:
        """Top-`fetch` items per job: every personalised job's interests in one tower pass and one index search.

        inputs: `tower_inputs` of the personalised jobs' states, when the caller encoded them already (the model
        process)."""
        timings = BatchTimings()
        out = [Found([], [], [])] * len(jobs)
        passing = {job.filter.key: self.passing(job.filter) for job in jobs if job.filter is not None}
        tower = [j for j, job in enumerate(jobs) if not job.state.popularity_only]
        if tower:
            t0 = time.perf_counter()
            if inputs is None:
                inputs = self.tower_inputs([jobs[j].state for j in tower])
            vectors, mask = self.tower(inputs)
            t1 = time.perf_counter()
            groups: dict[Any, list[int]] = {}  # one search per distinct filter (None: unfiltered)
            for r, j in enumerate(tower):
                f = jobs[j].filter
                groups.setdefault(f.key if f is not None else None, []).append(r)
            for key, members in groups.items():
                rows = np.asarray(members)
                width = max(jobs[tower[r]].fetch for r in members)
                banned = [self.excluded(jobs[tower[r]]) for r in members]
                found = search_vectors(
                    self.searcher, vectors[rows], mask[rows], width, banned, passing.get(key) if key else None
                )
                for r, (labels, scores, interests) in zip(members, found, strict=True):
                    n = jobs[tower[r]].fetch
                    out[tower[r]] = Found(
                        self.index.ids[labels[:n]].tolist(), scores[:n].tolist(), interests[:n].tolist()
                    )
            timings.user_tower, timings.search = t1 - t0, time.perf_counter() - t1
        for j, job in enumerate(jobs):
            if job.state.popularity_only:
                out[j] = self.popular(job.fetch, self.excluded(job), passing[job.filter.key] if job.filter else None)
        return out, timings

    def rank(
        self, state: UserState, candidates: Sequence[str], k: int | None
    ) -> tuple[list[tuple[str, float]], list[str]]:
        """TDM order of one user's candidates (best first, at most k) and the candidates the ranker does not know."""
        if self.ranker is None or self.ranker_users is None:
            raise QuiverError("no ranker loaded (set QUIVER_RANKER)")
        stored = self.ranker_users.get(state.user_id)
        profile: dict[str, Any] = {**(stored[0] if stored else {}), **state.profile}
        return self.ranker.rank(profile, state.history, candidates, k)

    def warm(self) -> None:
        """One request through every stage, so the first real one pays no lazy initialisation."""
        first = [str(self.index.ids[self._popular_order[0]])] if self.index.ids.size else []
        probe = UserState("__warmup__", {"user_id": "__warmup__"}, first, "request", True)
        found, _ = self.recall([RecallJob(probe, min(10, max(1, self.index.index.ntotal)), [])])
        if self.ranker is not None and found[0].item_ids:
            self.rank(probe, found[0].item_ids, None)


def load_runtime(target: Target, device: str = "cpu") -> Runtime:
    """Load and verify the triple, then warm it; raises QuiverError if any part fails verification or pairing."""
    model = load_bundle(target.model, device=device)
    retriever_model(model)
    index = load_index(target.index, model_manifest=model.manifest, mmap=True)  # workers share its pages
    ranker = Ranker(load_bundle(target.ranker, device=device), device=device) if target.ranker else None
    rt = Runtime(model, index, ranker)
    rt.warm()
    return rt
