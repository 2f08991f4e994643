"""One table across evaluation folders (checkpoints), optionally with deltas against a baseline.

Each folder holds a metrics.json from `glmtune eval classify|generate|judge`; the columns shown are
the headline scalars of that task that at least one folder has.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from glmtune.errors import InputError

# Headline columns per task, in reading order.
COLUMNS = {
    "classification": ["accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                       "invalid_rate", "samples_per_s", "n_samples"],
    "generation": ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l", "meteor", "ter",
                   "n_samples"],
    "judge": ["mean_score", "qwk", "pearson", "mae", "mse", "failed_rate", "n_samples"],
}
LOWER_IS_BETTER = {"invalid_rate", "ter", "mae", "mse", "failed_rate"}
NO_DELTA = {"n_samples", "samples_per_s"}


def load_metrics(folder: str | Path) -> dict:
    path = Path(folder) / "metrics.json" if Path(folder).is_dir() else Path(folder)
    if not path.exists():
        raise InputError("no metrics.json here", file=path,
                         fix="pass folders written by `glmtune eval classify|generate|judge`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None


def compare_rows(folders: Sequence[str | Path], baseline: str | Path | None = None) -> dict:
    """{"columns": [...], "rows": [{"name", "is_baseline", "values": {col: v}, "deltas": {col: d}}]}."""
    names = ([str(baseline)] if baseline else []) + [str(f) for f in folders]
    loaded = [load_metrics(n) for n in names]
    tasks = {m.get("task", "classification") for m in loaded}
    if len(tasks) > 1:
        raise InputError(f"cannot compare different evaluation kinds {sorted(tasks)}",
                         fix="compare folders of one kind (all classify, all generate or all judge)")
    task = tasks.pop()
    columns = [c for c in COLUMNS.get(task, []) if any(isinstance(m.get(c), (int, float)) for m in loaded)]
    base = loaded[0] if baseline else None
    rows = []
    for i, (name, m) in enumerate(zip(names, loaded)):
        values = {c: m.get(c) for c in columns}
        deltas = {c: _delta(values[c], base.get(c)) for c in columns
                  if base is not None and i > 0 and c not in NO_DELTA}
        rows.append({"name": name, "is_baseline": bool(baseline) and i == 0, "values": values, "deltas": deltas})
    return {"task": task, "columns": columns, "rows": rows, "best": _best(rows, columns)}


def _delta(v: Any, b: Any) -> float | None:
    return v - b if isinstance(v, (int, float)) and isinstance(b, (int, float)) else None


def _best(rows: list[dict], columns: list[str]) -> dict[str, str]:
    """Column -> name of the best row (for highlighting); ties go to the first."""
    best = {}
    for c in columns:
        if c in NO_DELTA and c != "samples_per_s":
            continue
        cands = [(r["values"][c], r["name"]) for r in rows if isinstance(r["values"][c], (int, float))]
        if cands:
            pick = min if c in LOWER_IS_BETTER else max
            best[c] = pick(cands, key=lambda t: t[0])[1]
    return best


def _cell(row: dict, col: str) -> str:
    v = row["values"][col]
    if v is None:
        return "n/a"
    text = str(v) if isinstance(v, int) else f"{v:.4f}"
    d = row["deltas"].get(col)
    return text if d is None else f"{text} ({d:+.4f})"


def _improved(col: str, d: float | None) -> bool | None:
    if d is None or abs(d) < 1e-12:
        return None
    return (d < 0) if col in LOWER_IS_BETTER else (d > 0)


def rich_table(cmp: dict):
    """A rich Table: best value per column in bold, deltas green when better, red when worse."""
    from rich.table import Table
    table = Table(title=f"{cmp['task']} comparison", show_lines=False)
    table.add_column("eval folder", overflow="fold")
    for c in cmp["columns"]:
        table.add_column(c, justify="right")
    for r in cmp["rows"]:
        cells = []
        for c in cmp["columns"]:
            style = {True: "green", False: "red", None: ""}[_improved(c, r["deltas"].get(c))]
            bold = "bold " if cmp["best"].get(c) == r["name"] else ""
            text = _cell(r, c)
            cells.append(f"[{bold}{style}]{text}[/]" if (bold or style) else text)
        table.add_row(r["name"] + (" (baseline)" if r["is_baseline"] else ""), *cells)
    return table


def markdown_table(cmp: dict) -> str:
    from glmtune.evaluate.report import md_table
    rows = []
    for r in cmp["rows"]:
        cells = [f"**{_cell(r, c)}**" if cmp["best"].get(c) == r["name"] else _cell(r, c) for c in cmp["columns"]]
        rows.append([r["name"] + (" (baseline)" if r["is_baseline"] else "")] + cells)
    lower = sorted(set(cmp["columns"]) & LOWER_IS_BETTER)
    note = "Best per column in bold; (±x) = difference from the baseline."
    if lower:
        note += f" Lower is better for {', '.join(lower)}."
    return f"# {cmp['task']} comparison\n\n{md_table(['eval folder'] + cmp['columns'], rows)}\n\n{note}\n"
