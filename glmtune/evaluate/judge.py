"""LLM-as-judge: a rubric prompt per sample, a score parsed from the reply, agreement metrics.

The judge is any ``Callable[[list[dict]], str]`` (chat messages in, reply text out):
:class:`OpenAIChatJudge` talks to any OpenAI-compatible endpoint with httpx; a local model can be
wrapped the same way later. A reply we cannot parse into a score on the rubric's scale is retried,
then recorded as failed; one bad sample never stops the run.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from glmtune.errors import GlmtuneError, InputError
from glmtune.infer.llm import OpenAIChatClient
from glmtune.io import iter_jsonl, read_text_utf8, write_json_atomic, write_jsonl_atomic, write_text_atomic

log = logging.getLogger(__name__)

JudgeFn = Callable[[list[dict]], str]


@dataclass(frozen=True)
class Scale:
    """Valid scores: lo..hi in multiples of step (IELTS: 5.0..8.0 step 0.5 -> 7 bands)."""
    lo: float
    hi: float
    step: float

    def check(self, x: float) -> float | None:
        """x if it is a valid score on this scale, else None (off-range or between steps)."""
        if not (self.lo - 1e-9 <= x <= self.hi + 1e-9):
            return None
        k = (x - self.lo) / self.step
        return round(self.lo + round(k) * self.step, 6) if abs(k - round(k)) < 1e-6 else None


RUBRICS = {
    "general": ("You are a strict evaluator. Rate the ANSWER to the QUESTION for correctness, helpfulness "
                "and clarity{reference_clause}.\n\nQUESTION:\n{question}\n\nANSWER:\n{prediction}\n{reference_block}"
                "\nGive an integer score from {lo:g} to {hi:g}. Reply with JSON only: "
                '{{"score": <number>, "reason": "<one sentence>"}}', Scale(1, 10, 1)),
    "ielts": ("You are a certified IELTS Writing examiner. Score the ESSAY below on the IELTS band scale, "
              "considering Task Response, Coherence and Cohesion, Lexical Resource, and Grammatical Range "
              "and Accuracy.\n\nTASK:\n{question}\n\nESSAY:\n{prediction}\n{reference_block}"
              "\nGive the overall band from {lo:g} to {hi:g} in steps of {step:g}. Reply with JSON only: "
              '{{"score": <band>, "reason": "<one sentence>"}}', Scale(5.0, 8.0, 0.5)),
}

_JSON_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)
# "score: 7", "Band 6.5", "评分：8" ... then, failing that, a reply that is only a number.
_LABELLED_RE = re.compile(r"(?:score|band|rating|评分|分数)\s*[:：=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_RE = re.compile(r"^\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?)?\s*\**\s*\.?\s*$")


def parse_score(reply: str, scale: Scale) -> float | None:
    """Score from a judge reply: JSON {"score": x} first, then "score: x"/"band x", then a bare number.
    Returns None if nothing valid on the scale is found (the caller retries)."""
    for m in _JSON_RE.finditer(reply or ""):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        for key in ("score", "band", "rating"):
            if isinstance(obj, dict) and isinstance(obj.get(key), (int, float, str)):
                try:
                    return scale.check(float(obj[key]))
                except ValueError:
                    return None
    for rx in (_LABELLED_RE, _BARE_RE):
        m = rx.search(reply or "")
        if m:
            return scale.check(float(m.group(1)))
    return None


def build_messages(template: str, row: dict, scale: Scale) -> list[dict]:
    ref = row.get("reference")
    return [{"role": "user", "content": template.format(
        question=row.get("question") or row.get("prompt") or "(none)", prediction=row["prediction"],
        reference_clause=", compared with the REFERENCE answer" if ref else "",
        reference_block=f"\nREFERENCE:\n{ref}\n" if ref else "", lo=scale.lo, hi=scale.hi, step=scale.step)}]


class OpenAIChatJudge(OpenAIChatClient):
    """POST {url}/chat/completions on an OpenAI-compatible server (temperature 0 for repeatability)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 temperature: float = 0.0, max_tokens: int = 256):
        super().__init__(url, model, api_key=api_key, timeout=timeout, temperature=temperature,
                         max_tokens=max_tokens)


def judge_one(judge: JudgeFn, messages: list[dict], scale: Scale, retries: int) -> dict:
    """Ask up to 1 + retries times; malformed replies and transient errors use up an attempt."""
    replies: list[str] = []
    error = None
    for _ in range(1 + retries):
        try:
            reply = judge(messages)
        except GlmtuneError:
            raise
        except Exception as e:  # timeouts, 5xx, bad JSON body: recorded, never fatal
            error = f"{type(e).__name__}: {e}"
            replies.append(f"<error: {error}>")
            continue
        replies.append(reply)
        score = parse_score(reply, scale)
        if score is not None:
            return {"score": score, "attempts": len(replies), "replies": replies}
        error = "no valid score in reply"
    return {"score": None, "attempts": len(replies), "replies": replies, "error": error}


def judge_rows(rows: Sequence[dict], judge: JudgeFn, template: str, scale: Scale, retries: int = 2,
               workers: int = 4) -> list[dict]:
    """Judge every row (in parallel threads: the work is waiting on HTTP); results keep row order."""
    def one(i_row):
        i, row = i_row
        res = judge_one(judge, build_messages(template, row, scale), scale, retries)
        out = {"index": i, **{k: v for k, v in row.items() if k != "messages"}, **res}
        return out
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, enumerate(rows)))


def score_regression_metrics(y_true: Sequence[float], y_pred: Sequence[float], step: float = 0.5,
                             lo: float | None = None, hi: float | None = None) -> dict:
    """Agreement of predicted with reference scores: MSE, MAE, Pearson r, quadratic weighted kappa.

    QWK needs categories, so scores become integers score/step (IELTS: band*2); with sklearn's
    cohen_kappa_score(weights="quadratic"). sklearn weights by the *index* of a category in `labels`,
    so we pass every step from lo to hi (default: observed min..max): a band nobody used must still
    count in the distance, else 6.0 vs 7.0 would look like neighbours when 6.5 is absent.
    Pearson is None when either side is constant.
    """
    import numpy as np
    from scipy.stats import pearsonr
    from sklearn.metrics import cohen_kappa_score, mean_absolute_error, mean_squared_error
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(t) != len(p) or len(t) == 0:
        raise InputError(f"{len(t)} reference scores for {len(p)} predicted scores")
    constant = np.ptp(t) == 0 or np.ptp(p) == 0
    ti, pi = np.rint(t / step).astype(int), np.rint(p / step).astype(int)
    first = int(round(lo / step)) if lo is not None else int(min(ti.min(), pi.min()))
    last = int(round(hi / step)) if hi is not None else int(max(ti.max(), pi.max()))
    cats = list(range(min(first, ti.min(), pi.min()), max(last, ti.max(), pi.max()) + 1))
    with warnings.catch_warnings():  # sklearn warns on a single shared category; handled below
        warnings.simplefilter("ignore")
        qwk = float(cohen_kappa_score(ti, pi, labels=cats, weights="quadratic"))
    if math.isnan(qwk):  # one category on both sides: kappa is 0/0; identical ratings still agree fully
        qwk = 1.0 if np.array_equal(ti, pi) else float("nan")
    return {"n": int(len(t)), "mse": float(mean_squared_error(t, p)), "mae": float(mean_absolute_error(t, p)),
            "pearson": None if constant or len(t) < 2 else float(pearsonr(t, p)[0]),
            "qwk": None if math.isnan(qwk) else qwk,
            "exact_agreement": float(np.mean(ti == pi)),
            "within_one_step": float(np.mean(np.abs(ti - pi) <= 1))}


def load_judge_file(path: str | Path) -> list[dict]:
    """JSONL rows {"prediction": str, "question"?: str, "reference"?: str, "reference_score"?: number}."""
    rows = []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
            raise InputError("missing or non-string prediction", file=path, line=line, field="prediction",
                             fix='each row needs {"prediction": str} (optional question, reference, reference_score)')
        rs = row.get("reference_score")
        if rs is not None and not isinstance(rs, (int, float)):
            raise InputError(f"reference_score must be a number, got {rs!r}", file=path, line=line,
                             field="reference_score")
        rows.append(row)
    if not rows:
        raise InputError("no rows", file=path)
    return rows


def resolve_rubric(rubric: str) -> tuple[str, Scale | None]:
    """A preset name (general, ielts) -> (template, scale); else a path to a template file (scale None)."""
    if rubric in RUBRICS:
        return RUBRICS[rubric]
    path = Path(rubric)
    if not path.exists():
        raise InputError(f"rubric {rubric!r} is neither a preset ({', '.join(RUBRICS)}) nor a file",
                         field="rubric", fix="pass a preset name or a text file with {prediction} placeholders")
    text = read_text_utf8(path)
    if "{prediction}" not in text:
        raise InputError("rubric template has no {prediction} placeholder", file=path,
                         fix="write {prediction} where the answer goes (also {question}, {reference_block})")
    return text, None


def judge_report_files(rows: Sequence[dict], judge: JudgeFn, template: str, scale: Scale, out_dir: str | Path,
                       retries: int = 2, workers: int = 4, extra: dict | None = None) -> dict:
    """Judge rows; write judgments.jsonl, failed_judgments.jsonl, metrics.json and report.md."""
    from glmtune.evaluate.report import scores_markdown
    out_dir = Path(out_dir)
    results = judge_rows(rows, judge, template, scale, retries, workers)
    scored = [r for r in results if r["score"] is not None]
    failed = [r for r in results if r["score"] is None]
    metrics: dict[str, Any] = {"task": "judge", "n_samples": len(results), "n_scored": len(scored),
                               "n_failed": len(failed), "failed_rate": len(failed) / len(results),
                               "retries": retries, "scale": [scale.lo, scale.hi, scale.step],
                               "mean_score": sum(r["score"] for r in scored) / len(scored) if scored else None}
    pairs = [(r["reference_score"], r["score"]) for r in scored if r.get("reference_score") is not None]
    if pairs:
        metrics.update(score_regression_metrics([a for a, _ in pairs], [b for _, b in pairs], step=scale.step,
                                                lo=scale.lo, hi=scale.hi))
    metrics.update(extra or {})
    write_jsonl_atomic(out_dir / "judgments.jsonl", results)
    write_jsonl_atomic(out_dir / "failed_judgments.jsonl", failed)
    write_json_atomic(out_dir / "metrics.json", metrics)
    notes = [f"{len(failed)} sample(s) got no valid score after {1 + retries} attempts: see failed_judgments.jsonl"] \
        if failed else []
    write_text_atomic(out_dir / "report.md", scores_markdown(f"LLM judge ({len(results)} samples)", metrics, notes))
    return metrics
