"""The canonical record and its validation.

A record is one JSON object per line (docs/ARCHITECTURE.md):
``{"messages": [{"role", "content", "tool_calls"?, "metadata"?, "reasoning_content"?, "keep_reasoning"?}],
"tools"?, "label"?, "meta"?}``. ``tool_calls`` are OpenAI's (``{"type": "function", "function": {"name",
"arguments"}}``, arguments an object or a JSON string); ``reasoning_content`` is an assistant turn's thinking.
``content`` is a string, or a list of parts for vision-language models:
``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PATH | file://... | data:...;base64,...}``
with optional sizing ``min_pixels``/``max_pixels`` or ``resized_height``/``resized_width``.
Every reader ends in :func:`validate_record`, so later stages (templates, training) can trust the
shape and never re-check it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import InputError

ROLES = ("system", "user", "assistant", "observation", "tool")
TOOL_RESULT_ROLES = ("observation", "tool")
# Per-image sizing options (the names Qwen2-VL's starter code uses); all are pixel counts / sizes.
IMAGE_SIZE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
# Images are read from local files or inline data only: glmtune never fetches from the network.
IMAGE_SCHEMES_REFUSED = ("http://", "https://", "ftp://")


def validate_record(rec: Any, *, file: str | Path | None = None, line: int | None = None,
                    require_assistant: bool = True) -> dict:
    """Check ``rec`` against the canonical rules; return it unchanged or raise InputError at file:line.

    Rules: an optional single system message first; then user and assistant alternate, starting with
    user; observation/tool turns may follow an assistant turn that calls a tool (or another tool
    result) and must be followed by an assistant turn; no empty content.
    """
    where = {"file": file, "line": line}
    if not isinstance(rec, dict):
        raise InputError(f"expected a JSON object, got {type(rec).__name__}", **where)
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("missing or empty 'messages' list", field="messages", **where,
                         fix="each record needs at least a user and an assistant turn")
    for i, msg in enumerate(messages):
        _check_message_shape(msg, i, where)
    alignment = _check_alignment_fields(rec, where)
    # an alignment record's messages are the prompt: the answers are chosen/rejected/references
    _check_role_order(messages, where, require_assistant and not alignment)
    _check_optional_fields(rec, where)
    return rec


def _check_message_shape(msg: Any, i: int, where: dict) -> None:
    field = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise InputError(f"a message must be an object, got {type(msg).__name__}", field=field, **where)
    role = msg.get("role")
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}", field=f"{field}.role", **where,
                         fix=f"use one of {', '.join(ROLES)}")
    content = msg.get("content")
    check_content(content, f"{field}.content", **where)
    # An assistant turn that only calls a tool may have no visible text.
    if not content_text(content).strip() and not content_images(content) and not msg.get("tool_calls"):
        raise InputError(f"empty {role} turn", field=f"{field}.content", **where,
                         fix="remove the empty turn or fill in its text")
    if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
        raise InputError("tool_calls must be a list", field=f"{field}.tool_calls", **where)
    _check_reasoning_and_calls(msg, field, where)


def _check_reasoning_and_calls(msg: dict, field: str, where: dict) -> None:
    """GLM-4.5+ fields: ``reasoning_content`` (text), ``keep_reasoning`` (bool), OpenAI-style
    ``tool_calls`` (a function name and arguments as an object or a JSON string holding one)."""
    from glmtune.templates.glm45 import call_arguments

    for key, kind in (("reasoning_content", str), ("keep_reasoning", bool)):
        if key in msg and msg[key] is not None and not isinstance(msg[key], kind):
            raise InputError(f"{key} must be {'text' if kind is str else 'true or false'}, "
                             f"got {type(msg[key]).__name__}", field=f"{field}.{key}", **where)
    if msg.get("reasoning_content") is not None and msg["role"] != "assistant":
        raise InputError("only assistant turns have reasoning_content", field=f"{field}.reasoning_content", **where)
    for j, call in enumerate(msg.get("tool_calls") or []):
        try:
            call_arguments(call, f"{field}.tool_calls[{j}]")
        except InputError as e:
            raise InputError(e.problem, field=e.field, fix=e.fix, **where) from None


def check_content(content: Any, field: str, *, file: str | Path | None = None, line: int | None = None) -> None:
    """A message's ``content``: a string or a list of content parts, else InputError naming ``field``."""
    where = {"file": file, "line": line}
    if isinstance(content, list):
        for j, part in enumerate(content):
            _check_part(part, f"{field}[{j}]", where)
    elif not isinstance(content, str):
        raise InputError(f"content must be a string or a list of parts, got {type(content).__name__}",
                         field=field, **where)


def _check_part(part: Any, field: str, where: dict) -> None:
    """One content part: ``{"type": "text", "text"}`` or ``{"type": "image", "image", sizing?}``."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InputError("a text part needs a string 'text'", field=f"{field}.text", **where)
        return
    if kind != "image":
        raise InputError(f"unknown content part {kind!r}", field=f"{field}.type", **where,
                         fix='use {"type": "text", "text": ...} or {"type": "image", "image": PATH}')
    src = part.get("image")
    if not isinstance(src, str) or not src.strip():
        raise InputError("an image part needs 'image': a file path, file:// or data: URI",
                         field=f"{field}.image", **where)
    if src.lower().startswith(IMAGE_SCHEMES_REFUSED):
        raise InputError("image URLs are never fetched", field=f"{field}.image", **where,
                         fix="download the picture and give its local path, or a data: URI")
    for key in IMAGE_SIZE_KEYS:
        value = part.get(key)
        if key in part and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InputError(f"{key} must be a positive integer, got {value!r}", field=f"{field}.{key}", **where)
    if ("resized_height" in part) != ("resized_width" in part):
        raise InputError("resized_height and resized_width go together", field=field, **where,
                         fix="give both, or use min_pixels/max_pixels")


def content_text(content: str | list | None) -> str:
    """The text of a message's content: the string itself, or its text parts joined."""
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def content_images(content: str | list | None) -> list[dict]:
    """The image parts of a message's content (none for a string)."""
    if isinstance(content, list):
        return [p for p in content if isinstance(p, dict) and p.get("type") == "image"]
    return []


def _calls_tool(msg: dict) -> bool:
    # GLM-4 marks a function call with `metadata` (the function name); OpenAI style uses tool_calls.
    return bool(msg.get("tool_calls")) or bool(msg.get("metadata"))


def _check_role_order(messages: list[dict], where: dict, require_assistant: bool) -> None:
    prev: dict | None = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        field = f"messages[{i}].role"
        prev_role = prev["role"] if prev else None
        if role == "system":
            if i != 0:
                raise InputError("a system message may only come first", field=field, **where)
        elif role == "user":
            if prev_role not in (None, "system", "assistant"):
                raise InputError(f"user turn follows {prev_role!r}; roles out of order", field=field, **where,
                                 fix="user and assistant turns must alternate")
        elif role == "assistant":
            if prev_role not in ("user", *TOOL_RESULT_ROLES):
                raise InputError(f"assistant turn follows {prev_role or 'nothing'!r}; roles out of order",
                                 field=field, **where, fix="an assistant turn must answer a user or tool turn")
        else:  # observation / tool result
            if not (prev_role == "assistant" and _calls_tool(prev)) and prev_role not in TOOL_RESULT_ROLES:
                raise InputError(f"{role} turn without a preceding tool call", field=field, **where,
                                 fix="a tool result must follow an assistant turn with tool_calls/metadata")
        prev = msg
    last = messages[-1]["role"]
    if last in TOOL_RESULT_ROLES:
        raise InputError(f"conversation ends with a {last} turn", field=f"messages[{len(messages) - 1}].role",
                         **where, fix="a tool result must be followed by an assistant turn")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise InputError("no assistant turn to train on", field="messages", **where,
                         fix="add the assistant's answer")


def _check_optional_fields(rec: dict, where: dict) -> None:
    if "tools" in rec and not (isinstance(rec["tools"], list) and all(isinstance(t, dict) for t in rec["tools"])):
        raise InputError("tools must be a list of objects", field="tools", **where)
    label = rec.get("label")
    if "label" in rec and (not isinstance(label, (str, int, float)) or isinstance(label, bool)):
        raise InputError(f"label must be a string or number, got {type(rec['label']).__name__}",
                         field="label", **where)
    if "meta" in rec and not isinstance(rec["meta"], dict):
        raise InputError("meta must be an object", field="meta", **where)


def _check_alignment_fields(rec: dict, where: dict) -> bool:
    """Preference pairs (chosen/rejected) and gold/bad answers (references/bad_answers): the prompt ends
    with a user turn, answers are non-empty text, a pair differs, a gold list is not empty."""
    keys = [k for k in ("chosen", "rejected", "references", "bad_answers") if k in rec]
    if not keys:
        return False
    if ("chosen" in rec) != ("rejected" in rec):
        missing = "rejected" if "chosen" in rec else "chosen"
        raise InputError(f"missing field '{missing}'", field=missing, **where,
                         fix="a preference pair needs both chosen and rejected")
    for key in ("chosen", "rejected"):
        if key in rec and (not isinstance(rec[key], str) or not rec[key].strip()):
            raise InputError(f"{key} must be non-empty text", field=key, **where)
    if "chosen" in rec and rec["chosen"].strip() == rec["rejected"].strip():
        raise InputError("chosen and rejected are identical", field="rejected", **where,
                         fix="drop the pair: it teaches no preference")
    for key in ("references", "bad_answers"):
        if key in rec:
            items = rec[key]
            if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
                raise InputError(f"{key} must be a list of non-empty texts", field=key, **where)
    if "references" in rec and not rec["references"]:
        raise InputError("empty gold answer list", field="references", **where,
                         fix="give at least one gold answer, or drop the record")
    if rec["messages"][-1]["role"] != "user":
        raise InputError("the prompt of an alignment record must end with a user turn", field="messages", **where,
                         fix="put the answers in chosen/rejected or references, not in messages")
    return True


def record_position(rec: dict) -> tuple[str | None, int | None]:
    """(source file, line) a record came from, from its meta; used to point errors at the raw input."""
    meta = rec.get("meta") or {}
    return meta.get("source"), meta.get("line")


def record_text(rec: dict, include_system: bool = False) -> str:
    """The record's visible text, turns joined by newlines (for dedupe and length checks)."""
    return "\n".join(content_text(m["content"]) for m in rec["messages"] if include_system or m["role"] != "system")
