"""Built-in chat formats: messages, sharegpt, alpaca, prompt/completion, conversation lists, role-play."""
from __future__ import annotations

import json
from typing import Any

from glmtune.data.formats import RowContext, register_format

# Speaker names seen in public data sets -> canonical roles.
ROLE_ALIASES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "observation": "observation",
    "tool": "tool", "function": "observation",
}


def canonical_role(name: Any, ctx: RowContext, field: str) -> str:
    """A speaker name of a public data set (``human``, ``gpt``, ...) as a canonical role."""
    role = ROLE_ALIASES.get(str(name).strip().lower()) if isinstance(name, str) else None
    if role is None:
        raise ctx.error(f"unknown speaker {name!r}", field=field,
                        fix=f"use one of {', '.join(sorted(ROLE_ALIASES))}")
    return role


def require_text(value: Any, ctx: RowContext, field: str) -> str:
    """``value`` if it is a string, else the row's error naming ``field``."""
    if not isinstance(value, str):
        raise ctx.error(f"expected text, got {type(value).__name__}", field=field)
    return value


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend the row's system prompt, or the --system-file one when the row has none."""
    if messages and messages[0]["role"] == "system":
        return messages
    if system:
        return [{"role": "system", "content": system}, *messages]
    return messages


def row_system(row: dict, ctx: RowContext, keys=("system", "system_prompt")) -> str | None:
    """The row's own system prompt (the first of ``keys`` it has), else the --system-file one."""
    for key in keys:
        if row.get(key):
            return require_text(row[key], ctx, key)
    return ctx.options.get("system")


def row_extras(row: dict, ctx: RowContext) -> dict:
    """Fields carried over unchanged: tools (a list, or a JSON string as LLaMA-Factory writes it), label."""
    out: dict = {}
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ctx.error(f"tools is not valid JSON ({e.msg})", field="tools") from None
    if tools:
        out["tools"] = tools
    if row.get("label") is not None:
        out["label"] = row["label"]
    return out


# Message fields a `messages` row keeps (role is mapped): OpenAI's, GLM-4's metadata, reasoning.
MESSAGE_KEYS = ("content", "tool_calls", "metadata", "reasoning_content", "keep_reasoning", "tool_call_id", "name")


@register_format("messages", detect=(("messages",),))
def messages_record(row: dict, ctx: RowContext) -> dict:
    """OpenAI-style `messages` (role/content, assistant `tool_calls` and `reasoning_content`, `tool` results),
    optional `tools`; the canonical format itself."""
    raw = ctx.require(row, "messages", kind=list)
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ctx.error("a message must be an object", field=f"messages[{i}]")
        msg = {k: v for k, v in m.items() if k in MESSAGE_KEYS}
        msg = {"role": canonical_role(m.get("role"), ctx, f"messages[{i}].role"), **msg}
        if msg.get("content") is None and msg.get("tool_calls"):
            msg["content"] = ""
        messages.append(msg)
    keep = row.get("keep_reasoning")
    if keep is not None and not isinstance(keep, bool):
        raise ctx.error(f"keep_reasoning must be true or false, got {type(keep).__name__}", field="keep_reasoning")
    if keep:  # the record opts every assistant turn in: its reasoning is rendered and trained wherever it is
        messages = [{**m, "keep_reasoning": m.get("keep_reasoning", True)} if m["role"] == "assistant" else m
                    for m in messages]
    record = {"messages": with_system(messages, ctx.options.get("system")), **row_extras(row, ctx)}
    if isinstance(row.get("meta"), dict):
        record["meta"] = dict(row["meta"])
    return record


def _sharegpt_function_call(value: Any, ctx: RowContext, field: str) -> dict:
    """A `function_call` turn: one call {"name", "arguments"}, or a list of them (parallel calls, as
    LLaMA-Factory writes them)."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise ctx.error(f"function_call value is not JSON ({e.msg})", field=field) from None
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
        raise ctx.error("function_call must be a JSON object with a 'name' (or a list of them)", field=field)
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                           for c in calls]}


@register_format("sharegpt", detect=(("conversations",),))
def sharegpt_record(row: dict, ctx: RowContext) -> dict:
    """ShareGPT: `conversations` of {from, value} with human/gpt/system/function_call/observation."""
    turns = ctx.require(row, "conversations", kind=list)
    messages = []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ctx.error("each turn needs 'from' and 'value'", field=field)
        if turn["from"] == "function_call":
            messages.append(_sharegpt_function_call(turn["value"], ctx, f"{field}.value"))
            continue
        role = canonical_role(turn["from"], ctx, f"{field}.from")
        messages.append({"role": role, "content": require_text(turn["value"], ctx, f"{field}.value")})
    return {"messages": with_system(messages, row_system(row, ctx)), **row_extras(row, ctx)}


@register_format("alpaca", detect=(("instruction", "output"),))
def alpaca_record(row: dict, ctx: RowContext) -> dict:
    """Alpaca: instruction, input, output, optional system and history ([[question, answer], ...])."""
    instruction = require_text(ctx.require(row, "instruction"), ctx, "instruction")
    extra_input = row.get("input") or ""
    prompt = f"{instruction}\n{require_text(extra_input, ctx, 'input')}" if extra_input else instruction
    messages: list[dict] = []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ctx.error("each history entry must be [question, answer]", field=f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": require_text(ctx.require(row, "output"), ctx, "output")}]
    return {"messages": with_system(messages, row_system(row, ctx)), **row_extras(row, ctx)}


@register_format("prompt_completion", detect=(("prompt", "completion"), ("prompt", "response")))
def prompt_completion_record(row: dict, ctx: RowContext) -> dict:
    """Single turn: `prompt` and `completion` (or `response`), optional `system`."""
    answer_key = "completion" if "completion" in row else "response"
    messages = [{"role": "user", "content": require_text(ctx.require(row, "prompt"), ctx, "prompt")},
                {"role": "assistant", "content": require_text(ctx.require(row, answer_key), ctx, answer_key)}]
    return {"messages": with_system(messages, row_system(row, ctx)), **row_extras(row, ctx)}


def conversation_turns(items: list, ctx: RowContext, key: str) -> list[dict]:
    """Turns as {role, content}, {from, value}, or pairs {human|user, assistant} (Firefly style)."""
    messages = []
    for i, item in enumerate(items):
        field = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ctx.error("each turn must be an object", field=field)
        if "role" in item or "from" in item:
            speaker, text = ("role", "content") if "role" in item else ("from", "value")
            role = canonical_role(item[speaker], ctx, f"{field}.{speaker}")
            messages.append({"role": role, "content": require_text(item.get(text), ctx, f"{field}.{text}")})
        elif ("human" in item or "user" in item) and "assistant" in item:
            q = "human" if "human" in item else "user"
            messages += [{"role": "user", "content": require_text(item[q], ctx, f"{field}.{q}")},
                         {"role": "assistant", "content": require_text(item["assistant"], ctx, f"{field}.assistant")}]
        else:
            raise ctx.error("cannot read this turn (expected role/content, from/value or human/assistant)",
                            field=field)
    return messages


def _conversation_key(row: dict, ctx: RowContext) -> str:
    for key in ("conversation", "dialogue", "dialog"):
        if key in row:
            return key
    raise ctx.error("missing field 'conversation'", field="conversation")


@register_format("conversation", detect=(("conversation",), ("dialogue",), ("dialog",)))
def conversation_record(row: dict, ctx: RowContext) -> dict:
    """Multi-turn `conversation` list (role/content, from/value or human/assistant pairs), optional system."""
    key = _conversation_key(row, ctx)
    messages = conversation_turns(ctx.require(row, key, kind=list), ctx, key)
    system = row_system(row, ctx, keys=("system", "system_prompt", "persona"))
    return {"messages": with_system(messages, system), **row_extras(row, ctx)}


@register_format("roleplay", detect=(("persona", "conversation"), ("persona", "dialogue")))
def roleplay_record(row: dict, ctx: RowContext) -> dict:
    """Role-play set: a persona/system prompt (in the row or --system-file) plus a conversation."""
    record = conversation_record(row, ctx)
    if not record["messages"] or record["messages"][0]["role"] != "system":
        raise ctx.error("role-play record has no system prompt", field="persona",
                        fix="add 'persona' or 'system' to the row, or pass --system-file")
    return record
