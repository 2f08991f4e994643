"""Confusion matrix PNG that stays readable with ~34 Chinese class names."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from glmtune.io import atomic_path

log = logging.getLogger(__name__)

INVALID_COLUMN = "(invalid)"


def confusion_counts(y_true: Sequence[str], y_pred: Sequence[Any], labels: list[str],
                     normalize: str | None) -> tuple[np.ndarray, list[str]]:
    """sklearn confusion matrix (rows = true), plus an "(invalid)" column only when some output was
    invalid, so a reader sees where unparseable answers came from without a fake all-zero row."""
    from sklearn.metrics import confusion_matrix
    from glmtune.evaluate.classification import INVALID, normalize_predictions
    preds, valid = normalize_predictions(y_pred, labels)
    cols = labels + ([INVALID] if not all(valid) else [])
    cm = confusion_matrix(list(y_true), preds, labels=cols, normalize=normalize)
    cm = np.nan_to_num(cm[: len(labels)])  # drop the INVALID row: no true label is ever invalid
    names = labels + ([INVALID_COLUMN] if len(cols) > len(labels) else [])
    return cm, names


def plot_confusion_matrix(y_true: Sequence[str], y_pred: Sequence[Any], labels: list[str], path: str | Path,
                          normalize: str | None = "true", title: str | None = None) -> Path:
    """Write the confusion matrix as PNG. normalize: "true" | "pred" | "all" | None (counts)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from glmtune.evaluate.fonts import find_cjk_font, has_cjk

    cm, col_names = confusion_counts(y_true, y_pred, labels, normalize)
    family = find_cjk_font() if any(has_cjk(str(x)) for x in col_names) else None
    # DejaVu Sans after the CJK font: matplotlib (>=3.6) falls back per glyph for Latin/digits.
    rc = {"font.family": [family, "DejaVu Sans"] if family else ["DejaVu Sans"], "axes.unicode_minus": False}
    n_rows, n_cols = cm.shape
    # ~0.42 inch per class keeps 34 labels at 8 pt legible without overlapping.
    side = max(6.0, 0.42 * max(n_rows, n_cols) + 3.0)
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(side + 1.5, side), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None, aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        label_size = 8 if max(n_rows, n_cols) > 15 else 10
        ax.set_xticks(range(n_cols), labels=[str(c) for c in col_names], rotation=90, fontsize=label_size)
        ax.set_yticks(range(n_rows), labels=[str(r) for r in labels], fontsize=label_size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        norm_txt = {None: "counts", "true": "normalised over true labels (rows sum to 1)",
                    "pred": "normalised over predictions (columns sum to 1)", "all": "normalised over all samples"}
        ax.set_title(title or f"Confusion matrix ({norm_txt.get(normalize, normalize)})")
        _annotate(ax, cm, normalize, size=6 if max(n_rows, n_cols) > 15 else 9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    return Path(path)


def _annotate(ax, cm: np.ndarray, normalize: str | None, size: int) -> None:
    """Write each non-zero cell's value; white on dark cells so it stays readable."""
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        if v == 0:
            continue
        text = f"{v:.2f}".lstrip("0") if normalize else str(int(v))
        if normalize and text == ".00":
            continue  # rounding to 0 hides nothing useful and clutters 34x34 grids
        ax.text(j, i, text, ha="center", va="center", fontsize=size,
                color="white" if top and v > 0.6 * top else "black")
