"""What data synthesis and augmentation share when they ask an LLM for JSON.

- Prompts are editable text files (``glmtune/resources/prompts/NAME.LANG.txt``, or a file of the
  user's) filled with :class:`string.Template` (``$text``, ``$k``), so JSON examples in a prompt
  need no brace escaping.
- :func:`parse_json_list` is strict: the reply must hold one JSON array (a fenced ```json block or
  bare), or an object whose single list value is that array. Anything else is invalid.
- :func:`ask_json_lists` asks a batch of conversations and re-asks the invalid ones ``retries`` times
  with the model's reply and a correction appended; what is still invalid comes back as None.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Sequence

from glmtune.errors import GlmtuneError, InputError
from glmtune.io import read_text_utf8

PROMPT_DIR = Path(__file__).resolve().parents[1] / "resources" / "prompts"
LANGS = ("zh", "en")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def as_llm(llm, model: str | None = None, **options):
    """A client from ``llm``: a URL or model folder is opened (glmtune.infer.llm.open_llm, imported here
    so that ``glmtune.data`` does not load the inference stack); a ready client is returned as is."""
    if isinstance(llm, (str, Path)):
        from glmtune.infer.llm import open_llm
        return open_llm(llm, model, **options)
    return llm


def load_prompt(name: str, lang: str, path: str | Path | None = None) -> Template:
    """The template ``path`` if given, else the shipped ``NAME.LANG.txt``."""
    if lang not in LANGS:
        raise InputError(f"unknown language {lang!r}", field="lang", fix=f"use one of {', '.join(LANGS)}")
    return Template(read_text_utf8(path if path is not None else PROMPT_DIR / f"{name}.{lang}.txt"))


def fill_prompt(template: Template, source: str | Path | None = None, **values) -> str:
    try:
        return template.substitute(**values)
    except (KeyError, ValueError) as e:
        raise InputError(f"prompt template has an unknown or malformed placeholder ({e})", file=source,
                         fix=f"use only ${', $'.join(values)} (write $$ for a literal $)") from None


def parse_json_list(reply: str) -> list | None:
    """The JSON array in ``reply``, or None when there is none (the caller retries)."""
    text = (reply or "").strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    for candidate in (text, _outermost(text, "[", "]"), _outermost(text, "{", "}")):
        if not candidate:
            continue
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):  # {"pairs": [...]}: models like to wrap the array in an object
            lists = [v for v in value.values() if isinstance(v, list)]
            value = lists[0] if len(lists) == 1 else None
        if isinstance(value, list):
            return value
    return None


def _outermost(text: str, open_: str, close: str) -> str | None:
    start, end = text.find(open_), text.rfind(close)
    return text[start:end + 1] if 0 <= start < end else None


@dataclass
class Asked:
    """One conversation's outcome: the parsed list (None if invalid after every attempt), the replies."""
    items: list | None
    replies: list[str]
    error: str | None = None   # "invalid_json" or "llm_error: ..." when items is None


def ask_json_lists(llm, conversations: Sequence[list[dict]], *, retries: int = 1, lang: str = "zh") -> list[Asked]:
    """Ask every conversation (batched), then re-ask the invalid ones with a correction, ``retries`` times.

    A transport error (timeout, 5xx) uses up an attempt like an invalid reply does; an error that would
    repeat on every request (bad URL, model or key: GlmtuneError) stops the run.
    """
    correction = read_text_utf8(PROMPT_DIR / f"retry_json.{lang}.txt").strip()
    results = [Asked(None, []) for _ in conversations]
    pending = list(range(len(conversations)))
    convs = [list(c) for c in conversations]
    for _ in range(1 + retries):
        if not pending:
            break
        replies = _batch(llm, [convs[i] for i in pending])
        still = []
        for i, reply in zip(pending, replies):
            if isinstance(reply, Exception):
                results[i].replies.append(f"<error: {type(reply).__name__}: {reply}>")
                results[i].error = f"llm_error: {type(reply).__name__}"
                still.append(i)
                continue
            results[i].replies.append(reply)
            items = parse_json_list(reply)
            if items is None:
                results[i].error = "invalid_json"
                convs[i] = convs[i] + [{"role": "assistant", "content": reply or " "},
                                       {"role": "user", "content": correction}]
                still.append(i)
            else:
                results[i].items, results[i].error = items, None
        pending = still
    return results


def _batch(llm, conversations: list[list[dict]]) -> list:
    """Replies in order; when the batch call fails, each conversation is asked alone so that one bad
    request costs only itself."""
    try:
        return list(llm.batch(conversations))
    except GlmtuneError:
        raise
    except Exception:
        out: list = []
        for conv in conversations:
            try:
                out.append(llm(conv))
            except GlmtuneError:
                raise
            except Exception as e:  # timeouts, 5xx, a malformed response body: recorded, never fatal
                out.append(e)
        return out
