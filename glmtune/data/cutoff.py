"""What to do with encoded conversations longer than the cutoff: truncate, drop, or stop with an error.

Truncation prefers to cut at the end of the last whole assistant turn that fits (``turn_spans``
from the template), so the model never learns an answer without its end token; only when not even
the first answer fits is it cut at exactly ``cutoff`` tokens. A conversation left with no trained
token after truncation teaches nothing and is dropped (counted separately).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from glmtune.errors import InputError
from glmtune.templates import IGNORE_INDEX

ON_OVERFLOW = ("truncate", "drop", "error")


@dataclass
class OverflowReport:
    cutoff: int
    on_overflow: str
    total: int = 0
    overflowed: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_untrainable: int = 0          # truncated to nothing trainable
    longest: int = 0
    examples: list[str] = field(default_factory=list)   # "file:line (N tokens)" of the first few

    def summary(self) -> str:
        if not self.overflowed:
            return f"all {self.total} conversations fit in {self.cutoff} tokens"
        return (f"{self.overflowed} of {self.total} conversations exceed {self.cutoff} tokens (longest "
                f"{self.longest}): {self.truncated} truncated, {self.dropped} dropped, "
                f"{self.dropped_untrainable} dropped with nothing left to train")


def _ids(enc: Any) -> tuple[list[int], list[int]]:
    if isinstance(enc, dict):
        return enc["input_ids"], enc["labels"]
    return enc.input_ids, enc.labels


def _with_ids(enc: Any, input_ids: list[int], labels: list[int], end: int) -> Any:
    if isinstance(enc, dict):
        return {**enc, "input_ids": input_ids, "labels": labels}
    if dataclasses.is_dataclass(enc):
        changes = {"input_ids": input_ids, "labels": labels}
        if hasattr(enc, "turn_spans"):
            changes["turn_spans"] = [(s, e) for s, e in enc.turn_spans if e <= end]
        return dataclasses.replace(enc, **changes)
    raise TypeError(f"cannot truncate a {type(enc).__name__}; expected a dict or an Encoded")


def _cut_point(enc: Any, cutoff: int) -> int:
    """End of the last whole assistant turn within ``cutoff``, else ``cutoff`` itself."""
    spans = getattr(enc, "turn_spans", None) or (enc.get("turn_spans") if isinstance(enc, dict) else None) or []
    ends = [end for _, end in spans if end <= cutoff]
    return max(ends) if ends else cutoff


def truncate_encoded(enc: Any, cutoff: int) -> Any:
    """A copy of ``enc`` at most ``cutoff`` tokens long, cut at a turn boundary when possible."""
    input_ids, labels = _ids(enc)
    end = _cut_point(enc, cutoff)
    return _with_ids(enc, input_ids[:end], labels[:end], end)


def apply_cutoff(encoded: Sequence[Any], cutoff: int, on_overflow: str = "truncate",
                 sources: Sequence[tuple[Any, Any]] | None = None) -> tuple[list[Any], OverflowReport]:
    """Apply the cutoff to encoded conversations (``Encoded`` or dicts with input_ids/labels).

    ``sources`` gives (file, line) per item so reports and errors point at the raw data.
    Returns the kept items (in order) and a report of what happened.
    """
    if on_overflow not in ON_OVERFLOW:
        raise InputError(f"unknown on_overflow {on_overflow!r}", field="on_overflow",
                         fix=f"use one of {', '.join(ON_OVERFLOW)}")
    if cutoff <= 0:
        raise InputError(f"cutoff must be a positive number of tokens, got {cutoff}", field="cutoff")
    report = OverflowReport(cutoff, on_overflow, total=len(encoded))
    kept = []
    for i, enc in enumerate(encoded):
        n = len(_ids(enc)[0])
        if n <= cutoff:
            kept.append(enc)
            continue
        file, line = sources[i] if sources else (None, None)
        _note_overflow(report, n, file, line, i)
        if on_overflow == "error":
            raise InputError(f"conversation is {n} tokens, longer than the cutoff {cutoff}", file=file,
                             line=line, field="messages",
                             fix="raise the cutoff, shorten the conversation, or use on_overflow truncate/drop")
        if on_overflow == "drop":
            report.dropped += 1
            continue
        cut = truncate_encoded(enc, cutoff)
        if all(lab == IGNORE_INDEX for lab in _ids(cut)[1]):
            report.dropped_untrainable += 1
            continue
        report.truncated += 1
        kept.append(cut)
    return kept, report


def _note_overflow(report: OverflowReport, n: int, file, line, index: int) -> None:
    report.overflowed += 1
    report.longest = max(report.longest, n)
    if len(report.examples) < 10:
        where = f"{file}:{line}" if file is not None else f"record {index}"
        report.examples.append(f"{where} ({n} tokens)")
