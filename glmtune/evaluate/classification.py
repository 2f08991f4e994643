"""Classification metrics and the report folder users read to pick a checkpoint.

Everything numeric comes from scikit-learn so our numbers are the ones users can reproduce.
A model-driven classifier (constrained scoring or generate + parse) only has to produce
``y_pred`` (``None`` for an output that could not be parsed) and optionally a probability per label,
then call :func:`classification_report_files`.

Folder written::

    metrics.json              all numbers (schema below), read by `glmtune eval compare`
    report.md                 the page a person reads first
    confusion_matrix.png      counts or row-normalised, CJK font
    predictions.jsonl         one row per sample (true, pred, valid, top-k probabilities)
    failed_predictions.jsonl  the rows where pred != true, invalid outputs included
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from glmtune.errors import InputError
from glmtune.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

# Stands in for an unparseable output so sklearn counts it as a wrong prediction of every class.
INVALID = "<invalid>"


def normalize_predictions(y_pred: Sequence[Any], labels: Sequence[str]) -> tuple[list[str], list[bool]]:
    """Map predictions outside the label set (None, unparsed text) to INVALID; return (preds, valid)."""
    label_set = set(labels)
    valid = [p in label_set for p in y_pred]
    return [p if ok else INVALID for p, ok in zip(y_pred, valid)], valid


def _check_inputs(y_true: Sequence[str], y_pred: Sequence[Any], labels: Sequence[str], probs) -> None:
    if len(y_true) != len(y_pred):
        raise InputError(f"{len(y_true)} true labels but {len(y_pred)} predictions",
                         fix="pass one prediction per sample (None for an unparseable output)")
    if not y_true:
        raise InputError("no samples to evaluate", fix="check the test file is not empty")
    if len(set(labels)) != len(labels):
        raise InputError("duplicate names in the label list", fix="list each label once")
    unknown = sorted({t for t in y_true if t not in set(labels)}, key=str)
    if unknown:
        raise InputError(f"true labels not in the label list: {unknown[:5]}",
                         fix="add them to the labels file or fix the test data")
    if probs is not None and np.shape(probs) != (len(y_true), len(labels)):
        raise InputError(f"probs has shape {np.shape(probs)}, expected ({len(y_true)}, {len(labels)})",
                         fix="one probability per label per sample, columns in label order")


def per_class_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, dict]:
    """{label: {precision, recall, f1, support}} from sklearn (zero_division=0: a class never
    predicted gets precision 0 rather than a warning and NaN)."""
    from sklearn.metrics import precision_recall_fscore_support
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), zero_division=0)
    return {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, lab in enumerate(labels)}


def most_confused_pairs(cm: np.ndarray, labels: Sequence[str], n: int = 10) -> list[dict]:
    """The n largest off-diagonal cells of a count matrix (rows = true, cols = predicted).

    ``share_of_true`` = count / support of the true class, i.e. how much of that class leaks there.
    """
    rows = []
    for i, true in enumerate(labels):
        support = int(cm[i].sum())
        for j, pred in enumerate(labels):
            if i != j and cm[i, j] > 0:
                rows.append({"true": true, "pred": pred, "count": int(cm[i, j]),
                             "share_of_true": float(cm[i, j] / support) if support else 0.0})
    rows.sort(key=lambda r: (-r["count"], -r["share_of_true"], str(r["true"]), str(r["pred"])))
    return rows[:n]


def top_k_summary(y_true: Sequence[str], probs: np.ndarray, labels: Sequence[str],
                  ks: Sequence[int] = (1, 3, 5)) -> dict:
    """Top-k accuracy (sklearn) and confidence of the argmax label, from per-label probabilities."""
    from sklearn.metrics import top_k_accuracy_score
    probs = np.asarray(probs, dtype=float)
    # sklearn requires `labels` sorted, with score columns in that order: permute columns to match.
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    sorted_labels, sorted_probs = [labels[i] for i in order], probs[:, order]
    # Two labels: sklearn reads the task as binary and wants one score column, the second label's.
    scores = sorted_probs[:, 1] if len(labels) == 2 else sorted_probs
    out: dict[str, Any] = {}
    for k in ks:
        if k < len(labels):  # k >= n_labels is trivially 1.0
            out[f"top_{k}_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=k, labels=sorted_labels))
    out["mean_confidence"] = float(probs.max(axis=1).mean())
    return out


def compute_classification_metrics(y_true: Sequence[str], y_pred: Sequence[Any], labels: Sequence[str],
                                   probs=None, n_pairs: int = 10) -> dict:
    """All classification numbers as one JSON-ready dict (see module docstring for where it goes).

    Invalid outputs count as wrong in accuracy and lower the recall of their true class; they are
    not a class of their own, so they never enter precision/F1 averages as a fake label.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
    labels = list(labels)
    _check_inputs(y_true, y_pred, labels, probs)
    preds, valid = normalize_predictions(y_pred, labels)
    y_true = list(y_true)
    out: dict[str, Any] = {"task": "classification", "n_samples": len(y_true), "n_labels": len(labels),
                           "accuracy": float(accuracy_score(y_true, preds))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, preds, labels=labels, average=avg, zero_division=0)
        out.update({f"f1_{avg}": float(f), f"precision_{avg}": float(p), f"recall_{avg}": float(r)})
    n_invalid = len(valid) - sum(valid)
    out.update({"invalid_count": n_invalid, "invalid_rate": n_invalid / len(valid)})
    cm = confusion_matrix(y_true, preds, labels=labels)
    out["per_class"] = per_class_metrics(y_true, preds, labels)
    out["most_confused_pairs"] = most_confused_pairs(cm, labels, n_pairs)
    if probs is not None:
        out["top_k"] = top_k_summary(y_true, probs, labels)
    out["labels"] = labels
    out["confusion_matrix"] = cm.tolist()  # raw counts, rows = true, cols = predicted (labels order)
    return out


def _top_k(row_probs, labels: Sequence[str], k: int) -> list[dict]:
    order = np.argsort(-np.asarray(row_probs, dtype=float))[:k]
    return [{"label": labels[i], "prob": round(float(row_probs[i]), 6)} for i in order]


def prediction_rows(y_true, y_pred, labels, probs=None, samples=None, raw_outputs=None, k: int = 3) -> list[dict]:
    """One JSON row per sample: index, true, pred (None if invalid), valid, correct, + optional extras."""
    label_set = set(labels)
    rows = []
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        ok = p in label_set
        row: dict[str, Any] = {"index": i, "true": t, "pred": p if ok else None, "valid": ok, "correct": ok and p == t}
        if samples is not None:
            row.update({k_: v for k_, v in samples[i].items() if k_ not in row})
        if raw_outputs is not None:
            row["raw_output"] = raw_outputs[i]
        elif not ok and p is not None:
            row["raw_output"] = p  # the unparseable text itself is the most useful thing to show
        if probs is not None:
            row["top_k"] = _top_k(probs[i], labels, k)
        rows.append(row)
    return rows


def classification_report_files(y_true: Sequence[str], y_pred: Sequence[Any], labels: Sequence[str],
                                out_dir: str | Path, probs=None, extra: dict | None = None, *,
                                samples: Sequence[dict] | None = None, raw_outputs: Sequence[str] | None = None,
                                normalize: str | None = "true", top_k: int = 3, title: str | None = None) -> dict:
    """Compute metrics and write the whole report folder; return the metrics dict.

    y_pred: a label, or None / any non-label string for an invalid output.
    probs: (n_samples, n_labels) probabilities in ``labels`` order, if the classifier has them.
    extra: merged into metrics.json (e.g. {"samples_per_s": 12.5, "mode": "constrained", "model": ...}).
    samples: per-sample dicts (id, text...) copied into predictions / failed_predictions rows.
    normalize: confusion matrix PNG normalisation, as sklearn: "true" (rows), "pred", "all" or None (counts).
    """
    from glmtune.evaluate.plots import plot_confusion_matrix
    from glmtune.evaluate.report import classification_markdown
    if samples is not None and len(samples) != len(y_true):
        raise InputError(f"{len(samples)} sample records for {len(y_true)} predictions")
    if raw_outputs is not None and len(raw_outputs) != len(y_true):
        raise InputError(f"{len(raw_outputs)} raw outputs for {len(y_true)} predictions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Predictions first: a failure in the metrics or the plot must never lose them.
    probs_arr = None if probs is None else np.asarray(probs, dtype=float)
    rows = prediction_rows(y_true, y_pred, list(labels), probs_arr, samples, raw_outputs, k=top_k)
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
    failed = [r for r in rows if not r["correct"]]
    write_jsonl_atomic(out_dir / "failed_predictions.jsonl", failed)
    metrics = compute_classification_metrics(y_true, y_pred, labels, probs=probs)
    for key, value in (extra or {}).items():
        metrics[key] = _jsonable(value)
    plot_confusion_matrix(y_true, y_pred, list(labels), out_dir / "confusion_matrix.png", normalize=normalize)
    metrics["confusion_matrix_normalize"] = normalize
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "report.md", classification_markdown(metrics, failed, title=title))
    return metrics


def _jsonable(value: Any) -> Any:
    """numpy scalars / NaN from callers' extras -> plain JSON values (NaN is not valid JSON)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
