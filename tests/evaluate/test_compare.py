"""`glmtune eval compare`: values, deltas against a baseline, best-per-column, markdown output."""
from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

import glmtune.cli.eval  # noqa: F401  (registers `eval` on the app)
from glmtune.cli.main import app
from glmtune.errors import InputError
from glmtune.evaluate.compare import compare_rows, markdown_table


def _write(folder, **metrics):
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"task": "classification", **metrics}), encoding="utf-8")
    return folder


def test_compare_with_baseline(tmp_path):
    base = _write(tmp_path / "base", accuracy=0.70, f1_macro=0.60, invalid_rate=0.038, n_samples=100)
    a = _write(tmp_path / "ck1", accuracy=0.80, f1_macro=0.75, invalid_rate=0.0, n_samples=100)
    b = _write(tmp_path / "ck2", accuracy=0.78, f1_macro=0.77, invalid_rate=0.01, n_samples=100)
    cmp = compare_rows([a, b], baseline=base)
    assert cmp["columns"] == ["accuracy", "f1_macro", "invalid_rate", "n_samples"]
    assert [r["name"] for r in cmp["rows"]] == [str(base), str(a), str(b)]
    assert cmp["rows"][1]["deltas"]["accuracy"] == pytest.approx(0.10)
    assert cmp["rows"][2]["deltas"]["invalid_rate"] == pytest.approx(-0.028)
    assert cmp["best"] == {"accuracy": str(a), "f1_macro": str(b), "invalid_rate": str(a)}
    md = markdown_table(cmp)
    assert "**0.8000 (+0.1000)**" in md and "Lower is better for invalid_rate" in md

    out = tmp_path / "cmp.md"
    res = CliRunner().invoke(app, ["eval", "compare", str(a), str(b), "--baseline", str(base), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text(encoding="utf-8") == md
    assert "ck2" in res.output


def test_compare_refuses_mixed_kinds(tmp_path):
    a = _write(tmp_path / "a", accuracy=0.5)
    g = tmp_path / "g"
    g.mkdir()
    (g / "metrics.json").write_text(json.dumps({"task": "generation", "bleu_4": 0.2}), encoding="utf-8")
    with pytest.raises(InputError, match="different evaluation kinds"):
        compare_rows([a, g])
    with pytest.raises(InputError, match="no metrics.json"):
        compare_rows([tmp_path / "missing"])
