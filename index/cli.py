"""`quiver-index`: build | list | verify | search | add | rebuild FAISS and ScaNN index bundles (DESIGN §6).

Exit codes (what a scheduler acts on):
    0  done: built and published, or already up to date (stdout's JSON says which: "status")
    1  unexpected failure (FAISS, I/O, a bug): worth a retry; the published index is untouched
    2  bad input (missing/incomplete bundle, unknown factory string, dimension mismatch, empty catalog, recall below
       the floor, failed verification): fix the input, a retry will fail the same way; the published index is
       untouched
Errors are one line on stderr. Paths default under $QUIVER_ARTIFACTS (else ./artifacts); with $QUIVER_REDIS_URL set,
every publish is announced on the Redis channel quiver:index:<name>.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from index.options import BuildOptions, PublishOptions, RunOptions
from models.errors import QuiverError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class RebuildFailed(Exception):
    """Some models of a rebuild had bad input; each was already reported on its own line."""


def artifacts() -> Path:
    return Path(os.environ.get("QUIVER_ARTIFACTS") or "artifacts")


def redis_url() -> str | None:
    return os.environ.get("QUIVER_REDIS_URL") or None


def _search_params(args: argparse.Namespace) -> dict[str, int]:
    out: dict[str, int] = {}
    if getattr(args, "nprobe", None) is not None:
        out["nprobe"] = args.nprobe
    if getattr(args, "ef_search", None) is not None:
        out["efSearch"] = args.ef_search
    if getattr(args, "leaves_to_search", None) is not None:
        out["leaves_to_search"] = args.leaves_to_search
    if getattr(args, "reorder", None) is not None:
        out["reorder"] = args.reorder
    return out


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True))


def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        allow_low_recall=args.allow_low_recall,
        batch=getattr(args, "batch", RunOptions.batch),  # only `build` has --batch
        threads=args.threads,
        progress=not args.no_progress,
    )


def _build_options(args: argparse.Namespace, factory: str | None) -> BuildOptions:
    return BuildOptions(
        factory=factory,
        search=_search_params(args),
        ef_construction=args.ef_construction,
        floor=args.recall_floor,
        num_queries=getattr(args, "queries", BuildOptions.num_queries),  # only `build` has --queries
        run=_run_options(args),
    )


def _publish_options(args: argparse.Namespace) -> PublishOptions:
    return PublishOptions(keep=args.keep, redis_url=redis_url())


def cmd_build(args: argparse.Namespace) -> None:
    from index.build import build

    result = build(args.model, args.out, _build_options(args, args.index), _publish_options(args), name=args.name)
    _print(result.summary())


def cmd_rebuild(args: argparse.Namespace) -> None:
    from index.rebuild import rebuild

    results = rebuild(args.models, args.out, _build_options(args, args.index), _publish_options(args), model=args.model)
    for r in results.results:
        _print(r.summary())
    for path, reason in results.skipped:
        _print({"status": "skipped", "model": str(path), "reason": reason})
    for path, reason in results.failed:
        print(f"quiver-index: error: {path}: {reason}".replace("\n", " "), file=sys.stderr)
    if results.failed:
        raise RebuildFailed(len(results.failed))


def cmd_add(args: argparse.Namespace) -> None:
    from index.upsert import add_items

    result = add_items(
        args.index, args.items, _run_options(args), _publish_options(args), model=args.model, models_root=args.models
    )
    _print(result.summary())


def cmd_list(args: argparse.Namespace) -> None:
    from index.bundle import read_index_manifest
    from index.publish import current_version
    from models.publish import versions

    root = Path(args.out)
    names = [args.name] if args.name else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if args.name and not (root / args.name).is_dir():
        raise QuiverError(f"{root / args.name}: no such index")
    for name in names:
        current = current_version(root / name)
        for version in reversed(versions(root / name)):  # newest first
            m = read_index_manifest(root / name / version)
            _print(
                {
                    "name": name,
                    "version": version,
                    "current": version == current,
                    "model_version": m["model"]["version"],
                    "index": m["index"]["factory"],
                    "search": m["index"].get("search", {}),
                    "num_items": m["num_items"],
                    "recall": m.get("quality", {}).get("recall"),
                    "created_at": m.get("created_at"),
                }
            )


def _model_for(index_manifest: dict[str, Any], model: str | None, models_root: str) -> Path:
    if model:
        return Path(model)
    return Path(models_root) / index_manifest["model"]["name"] / index_manifest["model"]["version"]


def cmd_verify(args: argparse.Namespace) -> None:
    from index.bundle import load_index, read_index_manifest, resolve_index
    from models.bundle import read_manifest, resolve_bundle, verify_files

    path = resolve_index(args.index)
    manifest = read_index_manifest(path)
    model_path = resolve_bundle(_model_for(manifest, args.model, args.models))
    model_manifest = read_manifest(model_path)
    verify_files(model_path, model_manifest)
    bundle = load_index(path, model_manifest=model_manifest)
    _print({"status": "ok", "path": str(bundle.path), "version": bundle.version, "model": str(model_path)})


def cmd_search(args: argparse.Namespace) -> None:
    from index.bundle import load_index, read_index_manifest, resolve_index
    from index.search import search

    path = resolve_index(args.index)
    manifest = read_index_manifest(path)
    exclude: list[list[str]] | None = None
    if args.vector is not None:
        try:
            values = [float(x) for x in args.vector.replace(",", " ").split()]
        except ValueError:
            raise QuiverError(f"--vector {args.vector!r}: not a list of numbers") from None
        bundle = load_index(path)
        if len(values) != bundle.dim:
            raise QuiverError(f"--vector has {len(values)} values, the index dimension is {bundle.dim}")
        vectors, mask = np.asarray([[values]], dtype=np.float32), None  # (1, 1, D)
    else:
        from models.bundle import load_bundle
        from models.inputs import user_vectors

        model = load_bundle(_model_for(manifest, args.model, args.models))
        bundle = load_index(path, model_manifest=model.manifest)
        user_ids = [str(u) for u in model.users.column("user_id").to_pylist()]
        if args.user_id not in user_ids:
            raise QuiverError(f"user {args.user_id!r}: not in {model.path / 'users.parquet'}")
        row = model.users.slice(user_ids.index(args.user_id), 1)
        history = (row.column("history").to_pylist()[0] if "history" in row.column_names else None) or []
        v, m = user_vectors(model, row, [history])  # (1, K, D), (1, K)
        vectors, mask = v.float().numpy(), m.numpy()
        exclude = [[str(i) for i in history]] if args.exclude_seen else None
    (hits,) = search(bundle, vectors, args.k, mask=mask, exclude=exclude)
    _print(
        {
            "index_version": bundle.version,
            "model_version": bundle.model_version,
            "items": [{"item_id": h.item_id, "score": round(h.score, 6), "interest": h.interest} for h in hits],
        }
    )


def parser() -> argparse.ArgumentParser:
    root = artifacts()
    p = argparse.ArgumentParser(
        prog="quiver-index",
        description="Build, publish and inspect FAISS and ScaNN index bundles.",
        epilog="exit codes: 0 done or up to date, 1 unexpected failure (retry), 2 bad input (fix it)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def build_opts(s: argparse.ArgumentParser) -> None:
        s.add_argument("--out", default=str(root / "indexes"), help="indexes root (default %(default)s)")
        s.add_argument("--recall-floor", type=float, default=0.95, help="minimum recall@100 (default %(default)s)")
        s.add_argument("--allow-low-recall", action="store_true", help="publish even below the recall floor")
        s.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: tuned)")
        s.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (default: tuned)")
        s.add_argument("--leaves-to-search", type=int, default=None, help="ScaNN leaves searched (default: tuned)")
        s.add_argument("--reorder", type=int, default=None, help="ScaNN candidates re-scored exactly (default: tuned)")
        s.add_argument(
            "--ef-construction", type=int, default=None, help="HNSW build breadth (default: 200; rebuild: the current)"
        )
        s.add_argument("--keep", type=int, default=3, help="published versions kept (default %(default)s)")
        s.add_argument("--threads", type=int, default=None, help="FAISS and ScaNN threads (default: all cores)")
        s.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("build", help="build, verify and publish an index for a model bundle")
    b.add_argument("--model", required=True, help="artifacts/models/NAME (its LATEST) or NAME/VERSION")
    b.add_argument(
        "--index",
        default="HNSW32,Flat",
        help="auto | scann | Flat | HNSW{M},Flat | IVF{n},Flat | IVF{n},SQ8 | IVF{n},PQ{m} | ScaNN{leaves}[,AH{d}] "
        "(default %(default)s; auto: the fastest candidate at the recall floor)",
    )
    b.add_argument("--name", default=None, help="index name (default: the model's name)")
    b.add_argument("--queries", type=int, default=1000, help="users sampled to measure recall")
    b.add_argument("--batch", type=int, default=8192, help="items per item-tower batch")
    build_opts(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("rebuild", help="index the newest bundle of each model unless already up to date")
    r.add_argument("--models", default=str(root / "models"), help="models root (default %(default)s)")
    r.add_argument("--model", default=None, help="only this model (a name under --models, or a path)")
    r.add_argument(
        "--index", default=None, help="layout, auto or scann (default: what the current index asked for, else auto)"
    )
    build_opts(r)
    r.set_defaults(func=cmd_rebuild)

    a = sub.add_parser("add", help="embed new or changed items and publish a new version")
    a.add_argument("--index", required=True, help="artifacts/indexes/NAME (its CURRENT) or NAME/VERSION")
    a.add_argument("--items", required=True, help="Parquet table with the catalog's columns")
    a.add_argument("--model", default=None, help="model bundle (default: the one the index was built from)")
    a.add_argument("--models", default=str(root / "models"))
    a.add_argument("--keep", type=int, default=3)
    a.add_argument("--allow-low-recall", action="store_true")
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_add)

    ls = sub.add_parser("list", help="published versions, newest first (one JSON line each)")
    ls.add_argument("--out", default=str(root / "indexes"))
    ls.add_argument("--name", default=None)
    ls.set_defaults(func=cmd_list)

    v = sub.add_parser("verify", help="check checksums, loadability and the model pairing")
    v.add_argument("--index", required=True, help="artifacts/indexes/NAME (its CURRENT) or NAME/VERSION")
    v.add_argument("--model", default=None, help="model bundle (default: the one the manifest names)")
    v.add_argument("--models", default=str(root / "models"))
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("search", help="top items for a user id or a vector (debugging)")
    s.add_argument("--index", required=True)
    who = s.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", default=None)
    who.add_argument("--vector", default=None, help="comma-separated floats")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--model", default=None)
    s.add_argument("--models", default=str(root / "models"))
    s.add_argument("--no-exclude-seen", dest="exclude_seen", action="store_false")
    s.set_defaults(func=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except RebuildFailed:
        return EXIT_BAD_INPUT
    except QuiverError as err:
        print(f"quiver-index: error: {err}".replace("\n", " "), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("quiver-index: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # anything else is a failure worth a retry, still reported as one line
        if os.environ.get("QUIVER_DEBUG"):
            raise
        text = f"{type(err).__name__}: {err}".replace("\n", " ")
        print(f"quiver-index: failed: {text}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
