"""Dataset statistics: counts, label distribution, and token lengths under a template + tokenizer."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from glmtune.data.records import content_text
from glmtune.templates import IGNORE_INDEX

PERCENTILES = (50, 90, 99)


@dataclass
class LengthStats:
    p50: int
    p90: int
    p99: int
    max: int
    mean: float

    @classmethod
    def of(cls, lengths: list[int]) -> "LengthStats":
        if not lengths:
            return cls(0, 0, 0, 0, 0.0)
        arr = np.asarray(lengths)
        # "higher" so a reported percentile is a length that really occurs, never interpolated.
        p = [int(np.percentile(arr, q, method="higher")) for q in PERCENTILES]
        return cls(*p, int(arr.max()), round(float(arr.mean()), 1))


@dataclass
class DataStats:
    records: int
    messages: int
    roles: dict[str, int]
    with_system: int
    with_tools: int
    turns: LengthStats                     # assistant turns per record
    chars: LengthStats                     # characters per record (all messages)
    labels: dict[str, int] = field(default_factory=dict)   # most common first
    tokens: LengthStats | None = None      # token ids per record under the template
    trained_tokens: int | None = None      # total trained (label != IGNORE_INDEX) tokens
    # reasoning (GLM-4.5+ <think>...</think>): tokens the template renders (and trains) inside think blocks,
    # and assistant turns whose reasoning it leaves out (turns before the last user message, by default)
    reasoning_tokens: int | None = None
    reasoning_dropped: int | None = None
    template: str | None = None
    cutoff: int | None = None
    over_cutoff: int | None = None
    # with a cutoff: what training does at data.cutoff_len (glmtune.data.cutoff.fit_records, the function
    # `glmtune train` encodes with): {"encoded", "truncated", "dropped", "answer_too_long", "no_loss"}
    after_cutoff: dict | None = None
    trained_tokens_after_cutoff: int | None = None
    cutoff_error: str | None = None  # training would stop before its first step (e.g. cutoff < system prompt)

    def as_dict(self) -> dict:
        out = {k: (vars(v) if isinstance(v, LengthStats) else v) for k, v in vars(self).items()}
        return {k: v for k, v in out.items() if v is not None}


def compute_stats(records: list[dict], *, template=None, tokenizer=None, cutoff: int | None = None,
                  train_on: str = "all_assistant", on_overflow: str = "truncate",
                  truncate_side: str = "left") -> DataStats:
    """Counts and distributions; token lengths when a template and tokenizer are given; with a cutoff, the
    counts training reports at that data.cutoff_len / on_overflow / truncate_side."""
    roles = Counter(m["role"] for r in records for m in r["messages"])
    labels = Counter(str(r["label"]) for r in records if "label" in r)
    stats = DataStats(
        records=len(records), messages=sum(roles.values()), roles=dict(roles),
        with_system=sum(bool(r["messages"]) and r["messages"][0]["role"] == "system" for r in records),
        with_tools=sum(bool(r.get("tools")) for r in records),
        turns=LengthStats.of([sum(m["role"] == "assistant" for m in r["messages"]) for r in records]),
        chars=LengthStats.of([sum(len(content_text(m["content"])) for m in r["messages"]) for r in records]),
        labels=dict(labels.most_common()), cutoff=cutoff)
    if template is not None and tokenizer is not None:
        lengths, trained = token_lengths(records, template, tokenizer, train_on)
        stats.template = template.name
        stats.tokens = LengthStats.of(lengths)
        stats.trained_tokens = trained
        stats.reasoning_tokens, stats.reasoning_dropped = reasoning_counts(records, template, tokenizer)
        if cutoff:
            from glmtune.data.cutoff import fit_records

            stats.over_cutoff = sum(n > cutoff for n in lengths)
            if on_overflow == "error":  # training stops at the first of the over_cutoff records
                return stats
            from glmtune.errors import ConfigError
            try:
                _, report = fit_records(records, template, tokenizer, cutoff, train_on=train_on,
                                        on_overflow=on_overflow, side=truncate_side)
            except ConfigError as e:  # stats report what training would say, they do not stop on it
                stats.cutoff_error = str(e)
                return stats
            stats.after_cutoff = report.counts()
            stats.trained_tokens_after_cutoff = report.trained_tokens
    return stats


def token_lengths(records: list[dict], template, tokenizer, train_on: str = "all_assistant") -> tuple[list[int], int]:
    """(length of each encoded record, total trained tokens)."""
    lengths, trained = [], 0
    for rec in records:
        enc = template.encode(tokenizer, rec["messages"], tools=rec.get("tools"), train_on=train_on)
        lengths.append(len(enc.input_ids))
        trained += sum(lab != IGNORE_INDEX for lab in enc.labels)
    return lengths, trained


def reasoning_counts(records: list[dict], template, tokenizer) -> tuple[int, int]:
    """(reasoning tokens the template renders, assistant turns whose reasoning it leaves out).

    A reasoning token is one between a ``<think>`` and a ``</think>`` control token of the segments
    training encodes (GLM-Z1, whose tags are text: the reasoning a segment holds before ``</think>``
    after a segment ending in ``<think>``); a turn's reasoning is left out when it has some
    (``reasoning_content`` or an inline ``<think>``) and its rendering holds none of it."""
    from glmtune.templates import Segment, segment_ids
    from glmtune.templates.glm45 import split_reasoning

    tokens = dropped = 0
    for rec in records:
        msgs = template.checked_messages(rec["messages"], rec.get("tools"))
        inside, opened, shown = False, False, set()
        for seg in template.segments(msgs, rec.get("tools"), False, True):
            if seg.special and seg.text in ("<think>", "</think>"):
                inside = seg.text == "<think>"
            elif inside and seg.text:
                tokens += len(segment_ids(tokenizer, seg))
                shown.add(seg.turn)
            elif opened and "</think>" in seg.text and seg.text.split("</think>")[0]:
                tokens += len(segment_ids(tokenizer, Segment(seg.text.split("</think>")[0], turn=seg.turn)))
                shown.add(seg.turn)
            opened = not seg.special and seg.text.endswith("<think>")
        dropped += sum(1 for t, m in enumerate(msgs) if m["role"] == "assistant"
                       and split_reasoning(m)[0].strip() and t not in shown)
    return tokens, dropped
