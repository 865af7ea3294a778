"""`quiver-index rebuild`: the batch job (cron, or the compose `index-builder` one-shot).

For each model (one named with --model, else every model folder under the models root) it takes the newest bundle
(LATEST), and builds, verifies and publishes its index unless the published one is already up to date: CURRENT was
built from that model version with the same factory string and search parameters (upserts on top of it included).
Running it again changes nothing, so a scheduler may run it as often as it likes.

The layout comes from --index, else from what the CURRENT index was asked for (a job keeps whatever a person chose;
an index `auto` chose is chosen again, among the candidates that suit the new catalog), else `auto`. Exit codes are
in `index.cli`.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from index.build import BuildResult, build
from index.bundle import read_index_manifest, resolve_index
from index.factory import AUTO, SCANN, IndexSpec, parse_spec
from index.options import DEFAULT_REBUILD, BuildOptions, PublishOptions
from index.publish import intact
from models.bundle import LATEST, load_bundle, read_manifest, resolve_bundle
from models.errors import QuiverError


def targets(models_root: Path, model: str | None) -> list[Path]:
    """Model folders (or one version folder) to rebuild: --model as a path, or as a name under the models root."""
    if model:
        p = Path(model)
        return [p if p.exists() else models_root / model]
    if not models_root.is_dir():
        raise QuiverError(f"{models_root}: no such models folder")
    found = sorted(p for p in models_root.iterdir() if p.is_dir() and (p / LATEST).is_file())
    if not found:
        raise QuiverError(f"{models_root}: no model bundles (no <name>/{LATEST})")
    return found


def _current(parent: Path) -> tuple[dict[str, Any] | None, bool]:
    """CURRENT's manifest (if readable) and whether its files verify: a damaged version is never 'up to date'."""
    try:
        folder = resolve_index(parent)
        return read_index_manifest(folder), intact(folder)
    except QuiverError:
        return None, False


@dataclass
class RebuildReport:
    results: list[BuildResult] = field(default_factory=list)  # built, repointed or up to date
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # bundles that are not retrieval models (rankers)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (model folder, one-line reason)


def requested(current: dict[str, Any]) -> str:
    """What --index the current index was built with (bundles from before `auto` recorded only the layout)."""
    return str(current.get("build", {}).get("request") or current["index"]["factory"])


def _up_to_date(
    current: dict[str, Any] | None, model_version: str, request: str, spec: IndexSpec | None, wanted: dict[str, int]
) -> bool:
    """Built from this model version as asked: the same layout and parameters, or the same `auto` / `scann`
    request (what it resolves to depends only on the catalog, which the model version fixes)."""
    if current is None or current["model"]["version"] != model_version:
        return False
    searched = not wanted or wanted == current["index"].get("search")
    if spec is None:
        return requested(current).lower() == request.lower() and searched
    return current["index"]["factory"] == spec.factory and current["index"].get("params") == spec.params and searched


def rebuild(
    models_root: str | Path,
    out_root: str | Path,
    options: BuildOptions,
    publish: PublishOptions,
    model: str | None = None,
) -> RebuildReport:
    """One model's bad input does not stop the others: it is reported in `failed` and the job goes on. A factory,
    search parameter or build breadth the options leave unset is the CURRENT index's, so a scheduled job keeps
    whatever a person chose."""
    report = RebuildReport()
    for target in targets(Path(models_root), model):
        try:
            path = resolve_bundle(target)
            manifest = read_manifest(path)
            if manifest.get("similarity") is None:  # a ranker (TDM) has no vector space to index
                if model:
                    raise QuiverError(f"{path}: a {manifest.get('model_type')} bundle has no item vectors to index")
                report.skipped.append((path, f"{manifest.get('model_type')} bundle: not a retrieval model"))
                continue
            name = str(manifest["name"])
            parent = Path(out_root) / name
            current, ok = _current(parent)
            factory = options.factory
            request = factory or (requested(current) if current else DEFAULT_REBUILD)
            ef = options.ef_construction
            if ef is None and current and not factory:  # the current index's build breadth, like its layout
                ef = current["index"].get("params", {}).get("efConstruction")
            keyword = request.strip().lower() in (AUTO, SCANN)
            spec = None if keyword else parse_spec(request, None, ef)
            wanted = {k: v for k, v in (options.search or {}).items() if v is not None}
            if not wanted and current and not factory:
                asked = current.get("build", {}).get("key", {}).get("search")
                wanted = asked if isinstance(asked, dict) else {}
            if ok and current is not None and _up_to_date(current, str(manifest["version"]), request, spec, wanted):
                report.results.append(BuildResult(resolve_index(parent), current["version"], "up_to_date", current))
                continue
            bundle = load_bundle(path)
            if spec is not None:
                request, ef = spec.factory, spec.params.get("efConstruction")
            elif request.strip().lower() == SCANN:
                ef = None
            chosen = replace(options, factory=request, ef_construction=ef, search=wanted)
            report.results.append(build(bundle.path, out_root, chosen, publish, name=name, bundle=bundle))
        except QuiverError as err:
            report.failed.append((target, str(err)))
    return report
