"""Model bundles (DESIGN §6): a versioned folder that holds everything needed to rebuild and serve a model.

    artifacts/models/<name>/<version>/
        manifest.json          model type + config, feature schema, table sizes, metrics, checksums, version
        weights.safetensors    state dict (tensors only: loading never executes code)
        vocab/<feature>.json   encodings: vocabularies, hash buckets, dense statistics
        items.parquet          the catalog the item tower encodes, with training `popularity`
        users.parquet          profiles + recent `history` (item ids, oldest first): the embedded user state

The version is a hash of the content, so the same model trained twice on the same data lands in the same folder.
Publication (staging folder, fsync, rename, LATEST under a lock) is models/publish.py's, shared with index bundles.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from models.errors import QuiverError
from models.features import FeatureEncoder, FeatureGroups
from models.match import MatchModel
from models.publish import MANIFEST, commit, staging
from models.registry import BundleModelConfig, build_bundle_model
from models.tdm import TDM

FORMAT = 1
WEIGHTS = "weights.safetensors"
LATEST = "LATEST"


@dataclass
class ModelBundle:
    path: Path
    manifest: dict[str, Any]
    model: MatchModel | TDM  # eval mode; TDM for a `tdm` ranker bundle (models/rank.py)
    encoder: FeatureEncoder
    items: pa.Table
    users: pa.Table

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_bundle(
    root: str | Path,
    name: str,
    model: MatchModel | TDM,
    model_config: dict[str, Any],
    encoder: FeatureEncoder,
    items: pa.Table,
    users: pa.Table,
    extra: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write a complete bundle under root/name/<version>/ and point root/name/LATEST at it; returns its path.

    `keep` newest versions survive (never the one LATEST names). The default keeps every version: an index's
    CURRENT names the model version it was built from and the service loads exactly that one, so deleting an old
    model version would break serving its index."""
    parent = Path(root) / name
    with staging(parent) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        for rel, text in encoder.to_files().items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        pq.write_table(items, tmp / "items.parquet")
        pq.write_table(users, tmp / "users.parquet")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        checksums = {rel: sha256_file(tmp / rel) for rel in files}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": name,
            "model_type": model_config["type"],
            "model": model_config,
            "features": encoder.groups.model_dump(mode="json"),
            "table_sizes": encoder.table_sizes(),
            # a sequence model's default output is its sequence width, known only to the built model
            "embedding_dim": model_config.get("output_dim") or getattr(model, "output_dim", None),
            "similarity": model.similarity,  # None for a ranker: it has no vector space
            "num_items": items.num_rows,
            "num_users": users.num_rows,
            "files": checksums,
            **(extra or {}),
        }
        # The version hashes the content only (not the creation time): same model, same version.
        version = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
        manifest["version"] = version
        manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return commit(tmp, version, LATEST, intact, keep)


def resolve_version(path: str | Path, pointer_name: str, what: str) -> Path:
    """A version folder (it holds a manifest), or a name folder whose pointer file (LATEST, CURRENT) names one."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    pointer = p / pointer_name
    if pointer.is_file():
        version = pointer.read_text().strip()
        if (p / version / MANIFEST).is_file():
            return p / version
        raise QuiverError(f"{pointer}: names version {version!r}, which has no {MANIFEST}")
    raise QuiverError(f"{p}: not {what} (no {MANIFEST}, no {pointer_name})")


def resolve_bundle(path: str | Path) -> Path:
    """A version folder, or a model folder whose LATEST names one."""
    return resolve_version(path, LATEST, "a model bundle")


def load_manifest_json(path: Path) -> Any:
    """The parsed manifest.json of a bundle folder (model or index); unreadable JSON is one line naming the file."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QuiverError(f"{path / MANIFEST}: unreadable manifest ({err})".replace("\n", " ")) from None


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise QuiverError(f"{path / MANIFEST}: not a format-{FORMAT} model bundle manifest")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any], what: str = "bundle", required: tuple[str, ...] = ()) -> None:
    """Every file the manifest lists exists with its checksum; `required` files must be listed at all."""
    files = manifest.get("files", {})
    for rel in required:
        if rel not in files:
            raise QuiverError(f"{path / MANIFEST}: no checksum for {rel}")
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise QuiverError(f"{f}: missing from the {what}")
        if sha256_file(f) != digest:
            raise QuiverError(f"{f}: checksum mismatch (corrupted or modified {what})")


def intact(folder: Path) -> bool:
    """A published model version whose manifest reads and whose files match their checksums: a same-version save
    keeps it, and replaces one that is not."""
    try:
        verify_files(folder, read_manifest(folder))
    except QuiverError:
        return False
    return True


def load_bundle(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> ModelBundle:
    """Rebuild the model from manifest + safetensors weights; nothing is unpickled."""
    p = resolve_bundle(path)
    manifest = read_manifest(p)
    if verify:
        verify_files(p, manifest)
    try:
        groups = FeatureGroups.model_validate(manifest["features"])
        model_cfg = TypeAdapter(BundleModelConfig).validate_python(manifest["model"])
    except (KeyError, ValidationError) as err:
        raise QuiverError(f"{p / MANIFEST}: invalid model or feature section ({err})") from None
    vocab_files = {rel: (p / rel).read_text() for rel in manifest["files"] if rel.startswith("vocab/")}
    encoder = FeatureEncoder.from_files(groups, vocab_files)
    model = build_bundle_model(model_cfg, groups, {k: int(v) for k, v in manifest["table_sizes"].items()})
    state = load_file(str(p / WEIGHTS), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise QuiverError(f"{p / WEIGHTS}: weights do not match the manifest's model ({err})") from None
    model.to(device).eval()
    return ModelBundle(
        p, manifest, model, encoder, pq.read_table(p / "items.parquet"), pq.read_table(p / "users.parquet")
    )
