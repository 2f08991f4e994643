"""Reading a GLM-4.5+ model's output back: reasoning, answer and tool calls, whole or streamed.

The inverse of glmtune.templates.glm45: what the model writes after the generation prompt is
``[<think>]reasoning</think>`` (glm45: ``\\n<think>…</think>\\n``), the answer, then zero or more
``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`` (glm45 with newlines).
The result is an OpenAI chat message: ``{"role": "assistant", "content", "reasoning_content",
"tool_calls"}`` with each call's ``arguments`` a JSON string, as OpenAI clients expect.

Argument values: the template writes strings as they are and anything else as JSON, so reading
one back is ambiguous ("42" may be the string or the number). With the request's ``tools``, a
parameter whose schema type is "string" stays text; otherwise a value that parses as JSON is
that JSON value (vLLM's GLM-4.5 parser does the same).

Streaming (:class:`GLMStreamParser`): the deltas joined equal the whole parse. Text that may
still become a tag (a trailing ``<thi``) or trailing whitespace (the whole parse strips it) is
held back until more arrives; a tool call is sent once its ``</tool_call>`` has come.
"""
from __future__ import annotations

import json
import re
import uuid

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def parse_glm_output(text: str, *, starts_in_reasoning: bool = False, tools: list | None = None) -> dict:
    """The assistant message in ``text`` (the decoded answer, stop token already cut)."""
    reasoning, rest = _split_reasoning(text, starts_in_reasoning)
    head, calls = _split_calls(rest)
    msg = {"role": "assistant", "content": head.strip(),
           "reasoning_content": reasoning.strip() if reasoning is not None else None}
    parsed = [_call(block, i, tools) for i, block in enumerate(calls)]
    if parsed:
        msg["tool_calls"] = parsed
    return msg


def _split_reasoning(text: str, starts_in_reasoning: bool) -> tuple[str | None, str]:
    """(reasoning or None, the rest). A ``<think>`` counts only at the start (after whitespace)."""
    if not starts_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return None, text
        text = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in text:
        return text, ""  # cut off while thinking (max tokens): all of it is reasoning
    reasoning, rest = text.split(THINK_CLOSE, 1)
    return reasoning, rest


def _split_calls(text: str) -> tuple[str, list[str]]:
    """(answer text, the inner text of each complete tool call)."""
    head, sep, tail = text.partition(CALL_OPEN)
    if not sep:
        return head, []
    calls = []
    for block in (CALL_OPEN + tail).split(CALL_OPEN)[1:]:
        inner, closed, _ = block.partition(CALL_CLOSE)
        if closed:
            calls.append(inner)
    return head, calls


def _call(block: str, index: int, tools: list | None) -> dict:
    name = block.split("<arg_key>", 1)[0].strip()
    types = _param_types(tools, name)
    args = {key.strip(): _value(value, types.get(key.strip())) for key, value in _ARG.findall(block)}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": index,
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _param_types(tools: list | None, name: str) -> dict:
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


def _value(text: str, schema_type):
    if schema_type == "string":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class GLMStreamParser:
    """Turn answer text arriving in pieces into OpenAI deltas (``reasoning_content`` / ``content``
    strings, ``tool_calls`` lists). ``feed(piece)`` and ``finish()`` return lists of deltas;
    ``message()`` is the whole parse of everything fed."""

    def __init__(self, *, starts_in_reasoning: bool = False, tools: list | None = None):
        self.starts_in_reasoning, self.tools = starts_in_reasoning, tools
        self.text = ""
        self.sent = {"reasoning_content": "", "content": ""}
        self.calls_sent = 0
        self.calls: list[dict] = []

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        return self._deltas(final=False)

    def finish(self) -> list[dict]:
        return self._deltas(final=True)

    def message(self) -> dict:
        msg = parse_glm_output(self.text, starts_in_reasoning=self.starts_in_reasoning, tools=self.tools)
        if self.calls:  # keep the ids already streamed
            msg["tool_calls"] = self.calls + msg.get("tool_calls", [])[len(self.calls):]
        return msg

    def _deltas(self, final: bool) -> list[dict]:
        text = self.text if final else _hold_back_tag(self.text)
        if not final and not self.starts_in_reasoning and THINK_OPEN.startswith(text.lstrip()):
            return []  # only whitespace so far, or the start of "<think>": wait
        reasoning, rest = _split_reasoning(text, self.starts_in_reasoning)
        head, calls = _split_calls(rest)
        out = []
        for key, value in (("reasoning_content", reasoning or ""), ("content", head)):
            now, done = value.strip(), self.sent[key]  # trailing whitespace waits: the whole parse strips it
            if len(now) > len(done) and now.startswith(done):
                out.append({key: now[len(done):]})
                self.sent[key] = now
        for i in range(self.calls_sent, len(calls)):
            call = _call(calls[i], i, self.tools)
            self.calls.append(call)
            out.append({"tool_calls": [call]})
        self.calls_sent = len(calls)
        return out


def _hold_back_tag(text: str) -> str:
    """``text`` without a trailing partial tag ("<", "<thi", "</tool_ca"): it may still become one."""
    cut = text.rfind("<")
    if cut == -1:
        return text
    tail = text[cut:]
    if any(tag.startswith(tail) and tag != tail for tag in (*_TAGS, CALL_CLOSE, "<arg_key>", "<arg_value>")):
        return text[:cut]
    return text
