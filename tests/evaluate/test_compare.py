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


def test_compare_off_a_terminal_prints_the_whole_table(tmp_path):
    """Piped or redirected (CliRunner is not a TTY), the table keeps its natural width: every row on
    one line with the full folder name and every column, not folded into 80 columns."""
    metrics = dict(accuracy=0.8, f1_macro=0.75, f1_weighted=0.74, precision_macro=0.7, recall_macro=0.72,
                   invalid_rate=0.01, n_samples=100)
    folders = [_write(tmp_path / f"run-{i}-lora-r16-lr2e-4-cutoff1024-checkpoint-{i * 500}", **metrics)
               for i in (1, 2)]
    res = CliRunner().invoke(app, ["eval", "compare", *map(str, folders)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    for folder in folders:
        row = next(line for line in res.output.splitlines() if str(folder) in line)
        assert len(row) > 80 and "0.7200" in row and "100" in row
