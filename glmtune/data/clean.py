"""Text cleaning with a report of what each rule changed.

Rules run in a fixed order on every message: control characters, emoji, self-introduction
(assistant turns only: a model that learns "你好，我是客服小王" repeats it in every answer),
whitespace. A record whose turn becomes empty is dropped and counted, never written half-clean.
"""
from __future__ import annotations

import copy
import re
import unicodedata
from dataclasses import dataclass, field

from glmtune.data.records import content_images, content_text, record_position
from glmtune.errors import InputError

RULES = ("control", "emoji", "self_intro", "whitespace")
DEFAULT_SELF_INTRO = r"^(你好|您好)，我是[^，。！]*[，。！]?"

# Emoji and pictographs, flags, variation selector 16 and the zero-width joiner that glues emoji.
# CJK punctuation (U+3000-303F) and full-width forms are deliberately outside these ranges.
_EMOJI_RE = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\U0001F1E6-\U0001F1FF"
    "\U0000FE0F\U0000200D\U000020E3\U0000231A-\U0000231B\U000023E9-\U000023FA]")
# Zero-width and direction marks are invisible but change tokenisation.
_INVISIBLE = {"\u200b", "\u200c", "\u200e", "\u200f", "\u2060", "\ufeff"}


def _strip_control(text: str) -> str:
    return "".join(c for c in text if c in "\n\t" or (unicodedata.category(c) != "Cc" and c not in _INVISIBLE))


def _strip_emoji(text: str) -> str:
    return _EMOJI_RE.sub("", text)


def _normalise_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ").replace("\t", " ")
    text = re.sub(r"[ \u00a0]{2,}", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


@dataclass
class RuleCount:
    messages: int = 0        # messages this rule changed
    chars_removed: int = 0   # net characters it removed


@dataclass
class CleanReport:
    records_in: int = 0
    records_out: int = 0
    records_changed: int = 0
    rules: dict[str, RuleCount] = field(default_factory=lambda: {r: RuleCount() for r in RULES})
    dropped: list[str] = field(default_factory=list)   # "file:line: why" of each dropped record

    def as_dict(self) -> dict:
        return {"records_in": self.records_in, "records_out": self.records_out,
                "records_changed": self.records_changed, "dropped": len(self.dropped),
                "rules": {k: vars(v) for k, v in self.rules.items()}}


@dataclass
class Cleaner:
    """Configured rules; ``self_intro`` is a regex matched at the start of assistant turns."""
    rules: tuple[str, ...] = RULES
    self_intro: str = DEFAULT_SELF_INTRO

    def __post_init__(self) -> None:
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise InputError(f"unknown clean rule(s) {', '.join(unknown)}", field="rules",
                             fix=f"choose from {', '.join(RULES)}")
        try:
            self._intro_re = re.compile(self.self_intro)
        except re.error as e:
            raise InputError(f"invalid self-introduction regex ({e})", field="self_intro") from None

    def clean_text(self, text: str, role: str, report: CleanReport) -> str:
        steps = {"control": _strip_control, "emoji": _strip_emoji,
                 "self_intro": lambda t: self._intro_re.sub("", t, count=1) if role == "assistant" else t,
                 "whitespace": _normalise_whitespace}
        for rule in RULES:  # fixed order regardless of how the rules were listed
            if rule not in self.rules:
                continue
            new = steps[rule](text)
            if new != text:
                report.rules[rule].messages += 1
                report.rules[rule].chars_removed += len(text) - len(new)
                text = new
        return text


def clean_records(records: list[dict], *, rules: tuple[str, ...] = RULES,
                  self_intro: str = DEFAULT_SELF_INTRO) -> tuple[list[dict], CleanReport]:
    """Clean every message of every record; return the kept records and a per-rule report."""
    cleaner = Cleaner(tuple(rules), self_intro)
    report = CleanReport(records_in=len(records))
    kept = []
    for rec in records:
        new = copy.deepcopy(rec)
        for msg in new["messages"]:
            if isinstance(msg["content"], list):  # content parts: clean the text ones, keep images
                for part in msg["content"]:
                    if part["type"] == "text":
                        part["text"] = cleaner.clean_text(part["text"], msg["role"], report)
            else:
                msg["content"] = cleaner.clean_text(msg["content"], msg["role"], report)
        empty = [i for i, m in enumerate(new["messages"])
                 if not content_text(m["content"]).strip() and not content_images(m["content"])
                 and not m.get("tool_calls")]
        if empty:
            file, line = record_position(rec)
            report.dropped.append(f"{file}:{line}: messages[{empty[0]}] is empty after cleaning")
            continue
        report.records_changed += new["messages"] != rec["messages"]
        kept.append(new)
    report.records_out = len(kept)
    return kept, report
