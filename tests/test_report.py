"""Tests for training/report.py: report.json and the Recall@K plot."""

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import QuiverError
from training.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_write_report_writes_json_and_png(tmp_path: Path) -> None:
    out_dir = tmp_path / "eval" / "ml-1m"  # does not exist yet
    report = {
        "dataset": "ml-1m",
        "models": {"dssm": {"Recall@20": np.float64(0.25), "users": np.int64(6040)}},
        "ks": np.array([20, 50]),
        "broken": float("nan"),
    }
    curves = {"dssm": {20: 0.25, 50: 0.4, 100: 0.55}, "popularity": {20: 0.1, 50: 0.18, 100: 0.3}}
    json_path, png_path = write_report(out_dir, report, curves, "ml-1m, leave-last-out test")

    assert json_path == out_dir / "report.json" and png_path == out_dir / "recall_at_k.png"
    text = json_path.read_text()
    loaded = json.loads(text)
    assert loaded == {
        "broken": None,
        "dataset": "ml-1m",
        "ks": [20, 50],
        "models": {"dssm": {"Recall@20": 0.25, "users": 6040}},
    }
    assert text.index('"broken"') < text.index('"dataset"') < text.index('"ks"')  # sorted keys
    assert '\n  "dataset"' in text  # indent 2

    data = png_path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
    assert sorted(p.name for p in out_dir.iterdir()) == ["recall_at_k.png", "report.json"]  # no temp files left


def test_write_report_overwrites_previous_files(tmp_path: Path) -> None:
    write_report(tmp_path, {"run": 1}, {"dssm": {10: 0.1}}, "first")
    json_path, _ = write_report(tmp_path, {"run": 2}, {"dssm": {10: 0.2}}, "second")
    assert json.loads(json_path.read_text()) == {"run": 2}


def test_write_report_rejects_empty_curves_and_unserialisable_values(tmp_path: Path) -> None:
    with pytest.raises(QuiverError, match="curves"):
        write_report(tmp_path, {}, {}, "none")
    with pytest.raises(QuiverError, match="object"):
        write_report(tmp_path, {"bad": object()}, {"dssm": {10: 0.1}}, "bad")
    assert not (tmp_path / "report.json").exists()
