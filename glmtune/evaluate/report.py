"""report.md pages: the first thing a person opens in an evaluation folder.

Order follows the questions a reader asks: how good overall -> how often broken -> which classes
fail and into what -> examples. Numbers are copied from metrics.json, never recomputed here.
"""
from __future__ import annotations

import json
from typing import Any, Sequence


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _f(x: Any, nd: int = 4) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731  (cells stay one line)
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _headline(m: dict) -> str:
    rows = [["accuracy", _pct(m["accuracy"])],
            ["F1 macro / weighted", f"{_f(m['f1_macro'])} / {_f(m['f1_weighted'])}"],
            ["precision macro / weighted", f"{_f(m['precision_macro'])} / {_f(m['precision_weighted'])}"],
            ["recall macro / weighted", f"{_f(m['recall_macro'])} / {_f(m['recall_weighted'])}"],
            ["invalid outputs", f"{m['invalid_count']} of {m['n_samples']} ({_pct(m['invalid_rate'])})"]]
    if m.get("samples_per_s") is not None:
        rows.append(["throughput", f"{m['samples_per_s']:.2f} samples/s"])
    for key, val in (m.get("top_k") or {}).items():
        rows.append([key.replace("_", " "), _f(val)])
    return md_table(["metric", "value"], rows)


def _confused(m: dict) -> str:
    pairs = m.get("most_confused_pairs") or []
    if not pairs:
        return "No confusions between classes."
    return md_table(["true", "predicted as", "count", "share of true class"],
                    [[p["true"], p["pred"], p["count"], _pct(p["share_of_true"])] for p in pairs])


def _per_class(m: dict, worst_first: bool) -> str:
    items = list(m["per_class"].items())
    if worst_first:
        items.sort(key=lambda kv: (kv[1]["f1"], -kv[1]["support"]))
    return md_table(["class", "precision", "recall", "F1", "support"],
                    [[lab, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]), v["support"]] for lab, v in items])


def _examples(failed: Sequence[dict], n: int = 10) -> str:
    if not failed:
        return "None: every prediction was correct."
    shown = [{k: v for k, v in r.items() if k not in ("correct",)} for r in failed[:n]]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in shown)
    more = f"\n\n… {len(failed) - n} more in `failed_predictions.jsonl`." if len(failed) > n else ""
    return f"```json\n{body}\n```{more}"


def _run_info(m: dict) -> str:
    skip = {"task", "per_class", "most_confused_pairs", "top_k", "labels", "confusion_matrix", "accuracy",
            "f1_macro", "f1_weighted", "precision_macro", "precision_weighted", "recall_macro",
            "recall_weighted", "invalid_count", "invalid_rate", "samples_per_s"}
    rows = [[k, v if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False)]
            for k, v in m.items() if k not in skip]
    return md_table(["setting", "value"], rows) if rows else ""


def classification_markdown(m: dict, failed: Sequence[dict], title: str | None = None) -> str:
    parts = [f"# {title or 'Classification evaluation'}", "",
             f"{m['n_samples']} samples, {m['n_labels']} classes.", "", "## Summary", "", _headline(m), "",
             "## Most confused pairs", "", _confused(m), "",
             "## Weakest classes (lowest F1 first)", "", _per_class(m, worst_first=True), "",
             "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)", "",
             f"## Failed predictions ({len(failed)})", "", _examples(failed), ""]
    info = _run_info(m)
    if info:
        parts += ["## Run", "", info, ""]
    return "\n".join(parts)


def scores_markdown(title: str, corpus: dict, notes: Sequence[str] = ()) -> str:
    """A short page for generation / judge runs: one table of corpus scores plus notes."""
    rows = [[k, _f(v) if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False)]
            for k, v in corpus.items()]
    parts = [f"# {title}", "", md_table(["metric", "value"], rows), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)
