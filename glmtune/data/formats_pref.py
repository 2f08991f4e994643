"""Alignment formats: preference pairs and the RLHF starter kit's gold/bad answers.

Canonical alignment records are ordinary records whose `messages` end with the user turn to answer
(the prompt) plus one of:

- ``chosen`` / ``rejected``: the preferred and the dispreferred answer text (DPO, reward model);
- ``references`` (gold answers) and optionally ``bad_answers`` (rewards; DPO/RM pair gold x bad).

Prompt-only records with a ``label`` need no format of their own: the `messages` format keeps the
label. These formats detect with priority 1, before the chat formats, so a row with `chosen` is never
read as plain `messages` (and its pair silently dropped).
"""
from __future__ import annotations

from typing import Any

from glmtune.data.formats import RowContext, register_format
from glmtune.data.formats_chat import (canonical_role, conversation_turns, require_text, row_extras, row_system,
                                      with_system)


def _answer_text(value: Any, ctx: RowContext, field: str) -> str:
    """An answer given as text, one message {role|from, content|value}, or a message list ending in it."""
    if isinstance(value, list):
        if not value:
            raise ctx.error("empty answer list", field=field)
        value = value[-1]
    if isinstance(value, dict):
        speaker, text = ("role", "content") if "role" in value else ("from", "value")
        if canonical_role(value.get(speaker), ctx, f"{field}.{speaker}") != "assistant":
            raise ctx.error("the answer must be an assistant turn", field=f"{field}.{speaker}")
        value = value.get(text)
    return require_text(value, ctx, field)


def _prompt_messages(row: dict, ctx: RowContext) -> list[dict]:
    """The conversation to answer, from messages / conversations / prompt (text or turns) / instruction+input."""
    for key in ("messages", "conversations", "conversation"):
        if key in row:
            msgs = conversation_turns(ctx.require(row, key, kind=list), ctx, key)
            break
    else:
        if "instruction" in row:
            text = require_text(row["instruction"], ctx, "instruction")
            extra = row.get("input") or ""
            msgs = [{"role": "user", "content": f"{text}\n{require_text(extra, ctx, 'input')}" if extra else text}]
        else:
            prompt = ctx.require(row, "prompt", kind=(str, list))
            msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else conversation_turns(prompt, ctx, "prompt"))
    return with_system(msgs, row_system(row, ctx))


def _text_list(row: dict, key: str, ctx: RowContext) -> list[str]:
    items = ctx.require(row, key, kind=list)
    if not items and key != "bad_answers":
        raise ctx.error("empty gold answer list", field=key, fix="give at least one gold answer, or drop the record")
    return [_answer_text(v, ctx, f"{key}[{i}]") for i, v in enumerate(items)]


@register_format("preference", detect=(("chosen", "rejected"),), priority=1)
def preference_record(row: dict, ctx: RowContext) -> dict:
    """Preference pair: {messages|prompt|conversations|instruction, chosen, rejected} (TRL/LLaMA-Factory)."""
    chosen = _answer_text(ctx.require(row, "chosen", kind=(str, dict, list)), ctx, "chosen")
    rejected = _answer_text(ctx.require(row, "rejected", kind=(str, dict, list)), ctx, "rejected")
    if not any(k in row for k in ("messages", "conversations", "conversation", "prompt", "instruction")):
        # TRL's implicit-prompt form: chosen and rejected are whole conversations sharing the prompt
        full = conversation_turns(ctx.require(row, "chosen", kind=list), ctx, "chosen")
        msgs = full[:-1]
    else:
        msgs = _prompt_messages(row, ctx)
    return {"messages": msgs, "chosen": chosen, "rejected": rejected, **row_extras(row, ctx)}


@register_format("rlhf", detect=(("gold_answers",), ("references",)), priority=1)
def rlhf_record(row: dict, ctx: RowContext) -> dict:
    """RLHF starter kit: {conversations|messages|prompt, gold_answers|references, bad_answers?}."""
    key = "gold_answers" if "gold_answers" in row else "references"
    record = {"messages": _prompt_messages(row, ctx), "references": _text_list(row, key, ctx), **row_extras(row, ctx)}
    if row.get("bad_answers") is not None:
        record["bad_answers"] = _text_list(row, "bad_answers", ctx)
    if record["messages"] and record["messages"][-1]["role"] == "assistant":
        record["messages"] = record["messages"][:-1]  # the answer turn is what the references stand for
    return record
