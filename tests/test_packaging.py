"""Packaging metadata and the Makefile's install order, checked from the files themselves."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

RUNTIME_DEPENDENCIES = {
    "torch",
    "numpy",
    "pyarrow",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "safetensors",
    "tqdm",
    "matplotlib",
    "faiss-cpu",
    "scann",
    "fastapi",
    "uvicorn",
    "redis",
    "prometheus-client",
    "orjson",
}


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines]
    return {canonicalize_name(req.name): req for req in parsed}


def test_metadata(project: dict[str, Any]) -> None:
    assert project["name"] == "quiver"
    assert project["version"] == "0.1.0"
    assert project["requires-python"] == ">=3.11"


def test_runtime_dependencies(project: dict[str, Any]) -> None:
    assert set(_requirements(project["dependencies"])) == RUNTIME_DEPENDENCIES


def test_torch_range_admits_the_local_wheel_only_up_to_2_14(project: dict[str, Any]) -> None:
    torch = _requirements(project["dependencies"])["torch"]
    assert torch.specifier.contains("2.13.0")
    assert torch.specifier.contains("2.14.1")
    assert not torch.specifier.contains("2.15.0")
    assert not torch.specifier.contains("2.12.1")


def test_pydantic_is_v2(project: dict[str, Any]) -> None:
    pydantic = _requirements(project["dependencies"])["pydantic"]
    assert not pydantic.specifier.contains("1.10.0")
    assert pydantic.specifier.contains("2.0.0")


def test_extras(project: dict[str, Any]) -> None:
    extras = project["optional-dependencies"]
    assert set(_requirements(extras["gpu"])) == {"faiss-gpu-cu12"}
    assert set(_requirements(extras["dev"])) == {"pytest", "ruff", "httpx", "triton", "schemathesis"}


def test_console_scripts(project: dict[str, Any]) -> None:
    assert project["scripts"] == {
        "quiver-train": "training.cli:main",
        "quiver-index": "index.cli:main",
        "quiver-serve": "service.cli:main",
    }


def test_package_discovery_excludes_tests_and_bench() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert set(find["include"]) == {"models*", "training*", "index*", "service*"}
    assert not any(pattern.startswith(("tests", "bench")) for pattern in find["include"])


def test_pytest_markers_declared() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    names = {marker.split(":")[0] for marker in options["markers"]}
    assert names == {"slow", "gpu"}


def _dry_run(*targets: str) -> list[str]:
    """What make would run for these targets, forced out of date (-B) and executed by nobody (-n)."""
    make = shutil.which("make")
    assert make is not None, "make is not installed"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    result = subprocess.run([make, "-n", "-B", *targets], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return result.stdout.splitlines()


def test_make_installs_pinned_torch_before_the_project() -> None:
    lines = _dry_run(".venv/.installed")
    torch = [i for i, line in enumerate(lines) if re.search(r"pip install torch==2\.13\.0\s*$", line)]
    project = [i for i, line in enumerate(lines) if "pip install -e '.[dev]'" in line]
    assert len(torch) == 1 and len(project) == 1
    assert torch[0] < project[0]
    assert lines[-1] == "touch .venv/.installed"


def test_make_test_installs_then_runs_pytest_single_threaded() -> None:
    lines = _dry_run("test")
    pytest_line = lines.index("OMP_NUM_THREADS=1 .venv/bin/python -m pytest")
    assert any("torch==2.13.0" in line for line in lines[:pytest_line])


def test_ci_script_is_executable_and_runs_make_test() -> None:
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert text.rstrip().endswith("make test")
