"""`make demo` and its TDM config, checked without training: the config validates against the demo catalog and the
DSSM it reranks, and the Makefile runs the pipeline in order and prints a curl example with real ids."""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import SETTING_VARIABLES, settings_from_env
from training.config import load_config
from training.data.demo import generate_demo
from training.tdm_config import load_tdm_config

ROOT = Path(__file__).resolve().parents[1]
DSSM = ROOT / "configs" / "dssm_demo.yaml"
TDM = ROOT / "configs" / "tdm_demo.yaml"
SASREC = ROOT / "configs" / "sasrec_demo.yaml"
MAKEFILE = ROOT / "Makefile"


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo catalog under <tmp>/artifacts/demo-data, the layout `make demo` writes."""
    root = tmp_path_factory.mktemp("demo-root")
    generate_demo(root / "artifacts" / "demo-data", n_users=60, n_items=120, n_categories=4, seed=1)
    return root


def test_tdm_demo_reranks_the_dssm_demo() -> None:
    tdm, dssm = load_tdm_config(TDM), load_config(DSSM)
    assert tdm.model.type == "tdm"
    assert tdm.output.name == "tdm_demo"
    assert dssm.output.name == "dssm_demo"
    # Retrieved negatives and validation come from the bundle `make demo` trains just before.
    assert tdm.negatives.retriever is not None and tdm.negatives.retrieved_ratio > 0
    assert Path(tdm.negatives.retriever) == Path(dssm.output.root) / dssm.output.name
    # Same catalog, same split: TDM's validation users are the DSSM's.
    assert tdm.data == dssm.data
    assert tdm.eval.retrieve_k >= max(tdm.eval.ks)


def test_tdm_demo_is_sized_for_a_minute_on_one_core() -> None:
    tdm = load_tdm_config(TDM)
    assert tdm.train.num_threads == 1
    assert tdm.train.epochs <= 5
    assert tdm.train.max_minutes is not None and tdm.train.max_minutes <= 3
    assert tdm.model.history_len <= tdm.data.max_seq_len


def test_tdm_demo_features_are_demo_catalog_columns(catalog: Path) -> None:
    tdm = load_tdm_config(TDM)
    data = catalog / "artifacts" / "demo-data"
    columns = {
        "user": set(pq.read_schema(data / tdm.data.users).names),
        "item": set(pq.read_schema(data / tdm.data.items).names),
    }
    for group in ("user", "item"):
        features = getattr(tdm.features, group)
        assert features, f"features.{group} is empty"
        for feature in features:
            assert feature.name in columns[group], f"features.{group}.{feature.name}: not a demo column"
    item_names = {f.name for f in tdm.features.item}
    assert {f.shared_with for f in tdm.features.hist} <= item_names


# ------------------------------------------------------------------------------------------------------------ Makefile


def _demo_recipe(*variables: str) -> list[str]:
    """The commands `make demo [VAR=value ...]` runs (install treated as done), one per line."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Under `make test` this is a sub-make: without the parent's MAKEFLAGS/MAKELEVEL it prints no directory lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "demo", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return [line for line in out.splitlines() if line and not line.startswith("echo ")]


def test_make_demo_runs_the_pipeline_in_order() -> None:
    steps = _demo_recipe()
    patterns = [
        r"quiver-train demo-data --out artifacts/demo-data$",
        r"quiver-train fit --config configs/dssm_demo\.yaml$",
        r"quiver-train fit --config configs/tdm_demo\.yaml$",
        r"quiver-index (rebuild --model dssm_demo|build --model artifacts/models/dssm_demo)\b",
        r'-c "\$DEMO_CURL"',
        r"^exec env .*quiver-serve$",
    ]
    found = []
    for pattern in patterns:
        hits = [i for i, step in enumerate(steps) if re.search(pattern, step)]
        assert len(hits) == 1, f"{pattern}: {len(hits)} steps match in {steps}"
        found.append(hits[0])
    assert found == sorted(found), steps
    assert found[-1] == len(steps) - 1  # serving is the last step and nothing runs after it


def test_make_demo_serves_the_demo_pair_on_8000() -> None:
    serve = _demo_recipe()[-1]
    env = dict(word.split("=", 1) for word in shlex.split(serve) if re.fullmatch(r"QUIVER_\w+=.*", word))
    assert env["QUIVER_MODEL"] == "dssm_demo"
    assert env["QUIVER_RANKER"] == "tdm_demo"
    assert env["QUIVER_PORT"] == "8000"
    assert Path(env["QUIVER_ARTIFACTS"]) == ROOT / "artifacts"
    settings = settings_from_env(env)
    assert settings.index_name == "dssm_demo"


def test_make_demo_can_serve_the_sasrec_retriever() -> None:
    steps = _demo_recipe("QUIVER_MODEL=sasrec_demo")
    fits = [re.search(r"quiver-train fit --config (\S+)$", step) for step in steps]
    assert [m.group(1) for m in fits if m] == [
        "configs/dssm_demo.yaml",
        "configs/sasrec_demo.yaml",
        "configs/tdm_demo.yaml",
    ]
    assert any(re.search(r"quiver-index rebuild --model sasrec_demo\b", step) for step in steps)
    env = dict(word.split("=", 1) for word in shlex.split(steps[-1]) if re.fullmatch(r"QUIVER_\w+=.*", word))
    assert env["QUIVER_MODEL"] == "sasrec_demo" and settings_from_env(env).index_name == "sasrec_demo"


def test_sasrec_demo_trains_on_the_demo_catalog(catalog: Path) -> None:
    cfg = load_config(SASREC)
    assert cfg.model.type == "sasrec" and cfg.output.name == "sasrec_demo"
    assert cfg.data.path == load_config(DSSM).data.path  # the folder make demo writes
    items = set(pq.read_schema(catalog / "artifacts" / "demo-data" / cfg.data.items).names)
    assert {f.source for f in cfg.features.item} <= items


def test_every_quiver_variable_in_the_makefile_is_a_service_setting() -> None:
    named = set(re.findall(r"\b(QUIVER_\w+)=", MAKEFILE.read_text()))
    assert {"QUIVER_MODEL", "QUIVER_RANKER"} <= named
    assert named <= SETTING_VARIABLES, f"not fields of service.settings.Settings: {sorted(named - SETTING_VARIABLES)}"


def test_make_demo_prints_curl_with_real_ids(
    catalog: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    match = re.search(r"^define DEMO_CURL\n(.*?)^endef$", MAKEFILE.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert match, "no DEMO_CURL block in the Makefile"
    script = catalog / "demo_curl.py"
    script.write_text(match.group(1))
    monkeypatch.chdir(catalog)
    monkeypatch.setattr(sys, "argv", [str(script), "8123"])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()

    data = catalog / "artifacts" / "demo-data"
    users = set(pq.read_table(data / "users.parquet")["user_id"].to_pylist())
    items = set(pq.read_table(data / "items.parquet")["item_id"].to_pylist())
    bodies = {}
    for line in lines:
        words = shlex.split(line)
        assert words[:4] == ["curl", "-s", "-X", "POST"]
        url = words[4]
        assert url.startswith("http://127.0.0.1:8123/")
        assert words[words.index("-H") + 1] == "Content-Type: application/json"
        bodies[url.rsplit("/", 1)[1]] = json.loads(words[words.index("-d") + 1])
    assert set(bodies) == {"recall", "rank"}
    assert bodies["recall"] == {"user_id": bodies["recall"]["user_id"], "k": 10, "rerank": True}
    assert bodies["recall"]["user_id"] in users
    assert bodies["rank"]["user_id"] in users
    assert bodies["rank"]["candidates"] and set(bodies["rank"]["candidates"]) <= items


def test_demo_configs_train_from_the_data_make_demo_writes() -> None:
    recipe = MAKEFILE.read_text()
    out = re.search(r"quiver-train demo-data --out (\S+)", recipe).group(1)
    for config in (DSSM, TDM):
        assert yaml.safe_load(config.read_text())["data"]["path"] == out
