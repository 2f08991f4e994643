"""The one overflow policy for conversations longer than the cutoff (training, `data stats`, evaluation).

A conversation is a list of template segments (glmtune.templates); each becomes a *piece*: its ids,
its labels and how many of its leading ids may never be cut. Control tokens, role headers, the
system prompt and the last assistant answer (the span `train_on: last_assistant` trains) are never
cut; only dialogue text is, token by token, from the side the config names:

- ``left`` (default) removes the oldest dialogue tokens first, keeping the end of the dialogue (where
  a classification task's deciding words usually are) right before the answer;
- ``right`` removes the newest dialogue tokens first (the end of the last user message first).

An earlier assistant answer that loses tokens stays as context but is no longer trained (a model
must not learn to produce an answer that starts mid-sentence). A record whose fixed part (control
tokens, headers, system prompt, last answer) alone exceeds the cutoff cannot be trained on and is
dropped and counted as ``answer_too_long``. Evaluation's prompt truncation
(glmtune.evaluate.classify.truncate_prompt) is the same cut with the answer left out, and a test
checks that both give the same prompt ids.

``on_overflow``: ``truncate`` (the policy above), ``drop`` (skip every overflowing record), ``error``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from glmtune.errors import ConfigError, InputError
from glmtune.templates import IGNORE_INDEX

ON_OVERFLOW = ("truncate", "drop", "error")
SIDES = ("left", "right")


@dataclass
class Piece:
    """One template segment as ids; ``keep`` leading ids (a role header, or all of it) are never cut."""
    ids: list[int]
    labels: list[int]
    keep: int
    turn: int = -1

    @property
    def cuttable(self) -> int:
        return len(self.ids) - self.keep


@dataclass
class Example:
    """An encoded record that fits the cutoff: its ids and labels (``IGNORE_INDEX`` = not trained)."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class OverflowReport:
    """What the cutoff did to a set of records: the numbers `glmtune train` and `data stats` print."""
    cutoff: int
    on_overflow: str = "truncate"
    side: str = "left"
    total: int = 0
    kept: int = 0
    overflowed: int = 0
    truncated: int = 0
    dropped: int = 0                      # on_overflow: drop
    answer_too_long: int = 0              # the fixed part + last answer alone exceed the cutoff
    answer_too_long_needs: int = 0        # the cutoff that would keep all of those (their longest fixed part)
    no_loss: int = 0                      # nothing left to train (e.g. train_on picks no token)
    longest: int = 0
    trained_tokens: int = 0               # label tokens of the kept records, after the cut
    examples: list[str] = field(default_factory=list)   # "file:line (N tokens)" of the first overflows

    def counts(self) -> dict[str, int]:
        """The training summary's keys: every record not kept is in exactly one of the last three."""
        return {"encoded": self.kept, "truncated": self.truncated, "dropped": self.dropped + self.answer_too_long,
                "answer_too_long": self.answer_too_long, "no_loss": self.no_loss}

    def summary(self) -> str:
        if not self.overflowed:
            return f"all {self.total} conversations fit in {self.cutoff} tokens"
        return (f"{self.overflowed} of {self.total} conversations exceed {self.cutoff} tokens (longest "
                f"{self.longest}): {self.truncated} truncated ({self.side} side), {self.dropped} dropped, "
                f"{self.answer_too_long} dropped because the answer alone does not fit; "
                f"{self.no_loss} without trained tokens")


def check_args(cutoff: int, on_overflow: str, side: str) -> None:
    if on_overflow not in ON_OVERFLOW:
        raise InputError(f"unknown on_overflow {on_overflow!r}", field="on_overflow",
                         fix=f"use one of {', '.join(ON_OVERFLOW)}")
    if side not in SIDES:
        raise InputError(f"unknown truncation side {side!r}", field="truncate_side", fix="use left or right")
    if cutoff <= 0:
        raise InputError(f"cutoff must be a positive number of tokens, got {cutoff}", field="cutoff")


# -- pieces ----------------------------------------------------------------------------------------
def segment_pieces(template, tokenizer, messages: Sequence[dict], tools: list | None = None, *,
                   train_on: str = "all_assistant", prompt: bool = False) -> list[Piece]:
    """The conversation's segments as pieces. ``prompt``: the generation prompt (evaluation, no answer);
    else the training encoding, labels from ``template.encode`` and the last answer protected whole."""
    from glmtune.templates import segment_ids

    msgs = template.checked_messages(messages, tools)
    segs = template.segments(msgs, tools, prompt, not prompt)
    ids = [segment_ids(tokenizer, s) for s in segs]
    labels = [[IGNORE_INDEX] * len(i) for i in ids]
    if not prompt:
        enc = template.encode(tokenizer, msgs, tools=tools, train_on=train_on)
        if [t for i in ids for t in i] != list(enc.input_ids):
            raise InputError("the template's segments do not give its training ids", field="template")
        labels, start = [], 0
        for i in ids:
            labels.append(list(enc.labels[start:start + len(i)]))
            start += len(i)
    answer = max((s.turn for s in segs if s.trained), default=None) if not prompt else None
    return [Piece(i, lab, len(i) if s.turn == answer and s.trained else _fixed_ids(tokenizer, s, msgs, i), s.turn)
            for s, i, lab in zip(segs, ids, labels)]


def _fixed_ids(tokenizer, seg, msgs: list[dict], seg_ids: list[int]) -> int:
    """How many leading ids of a segment may not be cut: all, unless it carries dialogue text; then only
    its role header (e.g. ``user\\n``). Special tokens and the system prompt are always whole."""
    from glmtune.templates import segment_ids

    msg = msgs[seg.turn] if 0 <= seg.turn < len(msgs) else None
    content = (msg or {}).get("content") or ""
    text = seg.text if seg.encode_as is None else seg.encode_as
    if seg.special or msg is None or msg.get("role") == "system" or not content or not text.endswith(content):
        return len(seg_ids)
    header = segment_ids(tokenizer, type(seg)(text=text[:len(text) - len(content)]))
    return len(header) if seg_ids[:len(header)] == header else 0


def cut_pieces(pieces: list[Piece], excess: int, side: str = "left") -> tuple[list[Piece], set[int]]:
    """Remove ``excess`` dialogue tokens from the pieces, oldest first (``left``) or newest first (``right``).

    Returns the cut pieces and the turns that lost tokens. Raises ValueError when fewer than ``excess``
    tokens may be cut (the caller decides whether that is a dropped record or a user error).
    """
    if excess > sum(p.cuttable for p in pieces):
        raise ValueError(f"only {sum(p.cuttable for p in pieces)} of the {excess} extra tokens are dialogue text")
    out, cut_turns = list(pieces), set()
    order = range(len(out)) if side == "left" else range(len(out) - 1, -1, -1)
    for j in order:
        if excess == 0:
            break
        p = out[j]
        cut = min(excess, p.cuttable)
        if cut <= 0:
            continue
        # left keeps the end of the text (drops the tokens right after the header), right keeps its start
        lo, hi = (p.keep, p.keep + cut) if side == "left" else (len(p.ids) - cut, len(p.ids))
        out[j] = Piece(p.ids[:lo] + p.ids[hi:], p.labels[:lo] + p.labels[hi:], p.keep, p.turn)
        cut_turns.add(p.turn)
        excess -= cut
    return out, cut_turns


def _join(pieces: list[Piece], untrained_turns: set[int]) -> Example:
    ids, labels = [], []
    for p in pieces:
        ids += p.ids
        labels += [IGNORE_INDEX] * len(p.labels) if p.turn in untrained_turns else p.labels
    return Example(ids, labels)


def truncate_prompt_ids(template, tokenizer, messages: Sequence[dict], max_len: int, side: str = "left",
                        tools: list | None = None) -> tuple[list[int], bool]:
    """Evaluation's side of the policy: the generation prompt cut to ``max_len`` ids (dialogue text only).

    Returns (ids, whether anything was cut). Raises InputError when the fixed part alone is longer."""
    pieces = segment_pieces(template, tokenizer, messages, tools, prompt=True)
    excess = sum(len(p.ids) for p in pieces) - max_len
    if excess <= 0:
        return [t for p in pieces for t in p.ids], False
    try:
        pieces, _ = cut_pieces(pieces, excess, side)
    except ValueError:
        raise InputError(f"--max-len {max_len} is shorter than the prompt's fixed part (template tokens, "
                         f"role headers, system prompt)", field="--max-len", fix="raise --max-len") from None
    return [t for p in pieces for t in p.ids], True


# -- records ---------------------------------------------------------------------------------------
def fit_records(records: Sequence[dict], template, tokenizer, cutoff: int, *, train_on: str = "all_assistant",
                on_overflow: str = "truncate", side: str = "left") -> tuple[list[Example], OverflowReport]:
    """Encode each record with the template's loss mask and apply the overflow policy.

    Returns the records that can be trained on (in order) and the report. A system prompt that alone
    reaches the cutoff is a config error: no record with it could ever be trained.
    """
    check_args(cutoff, on_overflow, side)
    report, kept = OverflowReport(cutoff, on_overflow, side, total=len(records)), []
    checked_systems: set[str] = set()
    for i, rec in enumerate(records):
        msgs = rec["messages"]
        if msgs and msgs[0]["role"] == "system" and msgs[0]["content"] not in checked_systems:
            checked_systems.add(msgs[0]["content"])
            _check_system_prompt(template, tokenizer, msgs, cutoff)
        fitted = _fit_one(rec, template, tokenizer, cutoff, train_on, on_overflow, side, report, i)
        if fitted is None:
            continue
        if all(lab == IGNORE_INDEX for lab in fitted.labels[1:]):
            report.no_loss += 1
            continue
        report.kept += 1
        report.trained_tokens += sum(lab != IGNORE_INDEX for lab in fitted.labels[1:])
        kept.append(fitted)
    return kept, report


def _fit_one(rec: dict, template, tokenizer, cutoff: int, train_on: str, on_overflow: str, side: str,
             report: OverflowReport, index: int) -> Example | None:
    enc = template.encode(tokenizer, rec["messages"], tools=rec.get("tools"), train_on=train_on)
    n = len(enc.input_ids)
    if n <= cutoff:
        return Example(list(enc.input_ids), list(enc.labels))
    meta = rec.get("meta") or {}
    _note_overflow(report, n, meta.get("source"), meta.get("line"), index)
    if on_overflow == "error":
        raise InputError(f"conversation has {n} tokens, more than the cutoff {cutoff}", file=meta.get("source"),
                         line=meta.get("line"), field="messages",
                         fix="raise data.cutoff_len (--cutoff) or set on_overflow: truncate / drop")
    if on_overflow == "drop":
        report.dropped += 1
        return None
    pieces = segment_pieces(template, tokenizer, rec["messages"], rec.get("tools"), train_on=train_on)
    try:
        pieces, cut_turns = cut_pieces(pieces, n - cutoff, side)
    except ValueError:
        report.answer_too_long += 1
        report.answer_too_long_needs = max(report.answer_too_long_needs, sum(p.keep for p in pieces))
        return None
    report.truncated += 1
    return _join(pieces, cut_turns)


def _check_system_prompt(template, tokenizer, msgs: list[dict], cutoff: int) -> None:
    """Tokens taken by the system message: prompt(system + first user) minus prompt(first user)."""
    user = next((m for m in msgs if m["role"] == "user"), None)
    if user is None:
        return
    n_sys = (len(template.encode_prompt(tokenizer, [msgs[0], user]))
             - len(template.encode_prompt(tokenizer, [user])))
    if n_sys >= cutoff:
        raise ConfigError(f"cutoff_len {cutoff} is shorter than the system prompt ({n_sys} tokens)",
                          field="data.cutoff_len", fix=f"set data.cutoff_len (--cutoff) above {n_sys}")


def _note_overflow(report: OverflowReport, n: int, file, line, index: int) -> None:
    report.overflowed += 1
    report.longest = max(report.longest, n)
    if len(report.examples) < 10:
        where = f"{file}:{line}" if file is not None else f"record {index}"
        report.examples.append(f"{where} ({n} tokens)")
