"""`quiver-train`: demo-data | fit | eval. Bad input ends with one line on stderr and exit code 2."""

import argparse
import sys
from pathlib import Path

import yaml

from models.errors import QuiverError


def cmd_demo_data(args: argparse.Namespace) -> None:
    from training.data.demo import generate_demo

    generate_demo(Path(args.out), n_users=args.users, n_items=args.items, n_categories=args.categories, seed=args.seed)
    print(Path(args.out).resolve())


def cmd_fit(args: argparse.Namespace) -> None:
    from training.config import load_config, read_yaml
    from training.tdm_config import is_tdm, parse_tdm_config
    from training.trainer import fit

    data = read_yaml(args.config)
    if is_tdm(data):  # the reranker has its own config and trainer
        from training.tdm_trainer import fit_tdm

        print(fit_tdm(parse_tdm_config(data, str(args.config))).bundle)
        return
    cfg = load_config(args.config)
    result = fit(cfg)
    if result.bundle is not None:
        print(result.bundle)


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from training.evaluate import evaluate_bundle

    report, out = evaluate_bundle(args.bundle, args.out)
    summary = {"model": report["model"], "popularity": report["popularity"], "report": str(out / "report.json")}
    print(json.dumps(summary))


def cmd_eval_rerank(args: argparse.Namespace) -> None:
    import json

    from training.rerank import evaluate_rerank

    report, out = evaluate_rerank(args.retriever, args.ranker, args.out, args.k, args.users)
    keys = ("retrieve_k", f"Recall@{report['retrieve_k']}", "relative_gain", "users")
    summary = {k: report[k] for k in keys} | {"retrieval": report["retrieval"], "reranked": report["reranked"]}
    print(json.dumps(summary | {"report": str(out / "report.json")}))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quiver-train", description="Train and evaluate Quiver retrieval models.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo-data", help="write the synthetic demo catalog (same seed, same bytes)")
    d.add_argument("--out", default="artifacts/demo-data")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--users", type=int, default=3000)
    d.add_argument("--items", type=int, default=4000)
    d.add_argument("--categories", type=int, default=24)
    d.set_defaults(func=cmd_demo_data)
    f = sub.add_parser("fit", help="train a model and write its bundle (prints the bundle path)")
    f.add_argument("--config", required=True)
    f.set_defaults(func=cmd_fit)
    e = sub.add_parser("eval", help="offline evaluation of a bundle on its test split, with a popularity baseline")
    e.add_argument("--bundle", required=True)
    e.add_argument("--out", default=None, help="report folder (default artifacts/reports/<name>/<version>)")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("eval-rerank", help="two-tower top-K per test user reranked by TDM: HR/NDCG before and after")
    r.add_argument("--retriever", required=True, help="two-tower model bundle")
    r.add_argument("--ranker", required=True, help="tdm model bundle")
    r.add_argument("--k", type=int, default=None, help="candidates per user (default: the ranker's eval.retrieve_k)")
    r.add_argument("--users", type=int, default=None, help="evaluate a seeded sample of this many test users")
    r.add_argument("--out", default=None, help="report folder (default artifacts/reports/rerank/<name>/<version>)")
    r.set_defaults(func=cmd_eval_rerank)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except QuiverError as err:
        print(f"quiver-train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, a path that is a directory: still one line
        print(f"quiver-train: error: {err}", file=sys.stderr)
        return 2
    except yaml.YAMLError as err:
        print(f"quiver-train: error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
