"""Writes an evaluation's report.json, its Recall@K plot and its per-user ranks.

Each file is written to a temporary name in the target directory and then renamed into place, so a reader (or a
crashed run) never sees a half-written report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.errors import QuiverError

REPORT_NAME = "report.json"
PLOT_NAME = "recall_at_k.png"
PER_USER_NAME = "per_user.npz"


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays become Python ones, non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise QuiverError(f"report: value of type {type(value).__name__} cannot be written to {REPORT_NAME}")


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temp file in path's directory, then os.replace it onto path."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _plot(curves: dict[str, dict[int, float]], title: str) -> Figure:
    """Recall against K, one marked line per model."""
    figure = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(figure)  # attaches the Agg canvas; no pyplot global state or GUI backend involved
    axes = figure.add_subplot()
    all_ks: set[int] = set()
    for model, curve in sorted(curves.items()):
        ks = sorted(int(kk) for kk in curve)
        all_ks.update(ks)
        axes.plot(ks, [curve[kk] for kk in ks], marker="o", label=model)
    axes.set_xticks(sorted(all_ks))
    axes.set_xlabel("K (ranking depth)")
    axes.set_ylabel("Recall@K")
    axes.set_ylim(bottom=0.0)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def write_report(out_dir: Path, report: dict, curves: dict[str, dict[int, float]], title: str) -> tuple[Path, Path]:
    """Write report.json (indent 2, sorted keys) and recall_at_k.png into out_dir; return (json path, png path).

    curves maps a model name to {K: recall}, e.g. {"dssm": {20: 0.1, 50: 0.2}, "popularity": {...}}; title should
    name the data set and split.
    """
    if not curves or any(not curve for curve in curves.values()):
        raise QuiverError("report: curves must name at least one model, each with at least one K")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / REPORT_NAME, out_dir / PLOT_NAME
    text = json.dumps(_jsonable(report), indent=2, sort_keys=True, allow_nan=False) + "\n"
    figure = _plot(curves, title)
    _write_atomic(json_path, lambda handle: handle.write(text.encode("utf-8")))
    _write_atomic(png_path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    return json_path, png_path


def write_per_user(out_dir: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write per_user.npz (plain arrays, no pickled objects: np.load(..., allow_pickle=False) reads it back)."""
    if any(a.dtype == object for a in arrays.values()):
        raise QuiverError(f"report: {PER_USER_NAME} holds plain arrays only (object arrays would need pickle)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PER_USER_NAME
    _write_atomic(path, lambda handle: np.savez(handle, **arrays))
    return path
