"""GLM-4.5+ templates: GLM-4.5 / 4.5-Air / 4.6 (``glm45``), GLM-4.7 / GLM-4.7-Flash (``glm47``).

Both follow the official chat templates byte for byte (copies with their sources:
tests/templates/official/). What they share: ``[gMASK]<sop>``, role tokens, an optional tools
block as a first ``<|system|>`` message, reasoning as ``<think>…</think>``, tool calls in GLM's
XML form and tool results as ``<tool_response>`` blocks after one ``<|observation|>``.

Thinking, as the official templates do it: an assistant message's reasoning comes from
``reasoning_content`` or, when that is absent, from an inline ``<think>…</think>`` at the start of
``content``. Reasoning renders only for turns after the last user message; earlier turns render an
empty block (glm45 ``\\n<think></think>``, glm47 a lone ``</think>``). So by default the reasoning
of earlier turns is neither seen nor trained, as at inference. A message with
``"keep_reasoning": true`` renders (and trains) its reasoning wherever it is (glmtune's opt-in; a
record-level ``keep_reasoning`` sets it on every assistant turn when the record is read; on glm47 the
official ``clear_thinking=False`` does this for every turn).

``enable_thinking=False`` (a template option: ``get_template("glm45", enable_thinking=False)``):
glm45 adds ``/nothink`` to every user turn and ``\\n<think></think>`` to the generation prompt;
glm47 ends the generation prompt in ``</think>`` instead of ``<think>``.

What is trained: exactly the assistant tokens the template renders, and the token that ends the
turn (the next role token; ``<|endoftext|>`` after the last turn, ``<|observation|>`` after a
final tool call). Text the generation prompt already holds is not trained, so the trained ids
are what the model writes after that prompt: glm47's ``<think>`` (its prompt ends with it), and
with ``enable_thinking=False`` an empty thinking block (glm45 ``\\n<think></think>``, glm47
``</think>``). Segments break only at special tokens, so the ids equal the tokenizer's ids of the
rendered text.
"""
from __future__ import annotations

import json
import re

from glmtune.errors import InputError
from glmtune.templates.base import Segment, Template, content_of

GLM45_TOOLS_HEAD = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
GLM45_TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the "
                    "following XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
                    "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
                    "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
GLM47_TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the "
                    "following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key>"
                    "<arg_value>{arg-value-1}</arg_value><arg_key>{arg-key-2}</arg_key>"
                    "<arg_value>{arg-value-2}</arg_value>...</tool_call>")
TOOL_RESULT_ROLES = ("tool", "observation")
_CALL_TAG = re.compile(r"(</?(?:tool_call|arg_key|arg_value)>)")  # special tokens of GLM-4.5+


def split_reasoning(msg: dict) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as the official template reads them:
    ``reasoning_content`` when it is a string, else an inline ``<think>…</think>`` in content."""
    content = content_of(msg)
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if "</think>" in content:
        head, tail = content.split("</think>")[0], content.split("</think>")[-1]
        return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), tail.lstrip("\n")
    return "", content


def call_arguments(call: dict, field: str) -> tuple[str, dict]:
    """(name, arguments as an object) of an OpenAI-style tool call; JSON-string arguments are parsed
    (GLM writes each argument as its own key/value pair, so they must be an object)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InputError("a tool call needs a function name", field=f"{field}.function.name",
                         fix='write {"type": "function", "function": {"name": ..., "arguments": {...}}}')
    args = fn.get("arguments")
    if args is None or args == "":
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise InputError(f"tool call arguments are not valid JSON ({e.msg})", field=f"{field}.function.arguments",
                             fix="give the arguments as a JSON object (or a string holding one)") from None
    if not isinstance(args, dict):
        raise InputError(f"tool call arguments must be an object, got {type(args).__name__}",
                         field=f"{field}.function.arguments", fix='write {"city": "Beijing"}, not a list or a value')
    return fn["name"], args


def arg_value_text(value) -> str:
    """An argument value as the template writes it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _GLM45Family(Template):
    """The walk both templates share; subclasses set the separators (``nl``) and thinking forms."""

    stop_tokens = ("<|endoftext|>", "<|user|>", "<|observation|>")
    supports_tools = True
    nl = "\n"                 # glm45 puts a newline after role tokens and inside tool calls; glm47 none
    tools_tail = GLM45_TOOLS_TAIL
    options = ("enable_thinking",)

    def __init__(self, enable_thinking: bool = True, **options):
        self.enable_thinking = bool(enable_thinking)
        for key, value in options.items():
            if key not in self.options:
                raise InputError(f"template '{self.name}' has no option '{key}'", field=key,
                                 fix=f"use {', '.join(self.options)}")
            setattr(self, key, bool(value))

    def variant(self, **options) -> "_GLM45Family":
        """The same family with some options replaced (a request's ``enable_thinking``)."""
        current = {key: getattr(self, key) for key in self.options}
        return type(self)(**{**current, **options})

    # -- the walk ------------------------------------------------------------------------------------
    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        segs = [Segment("[gMASK]", special=True), Segment("<sop>", special=True)] + self._tool_segments(tools)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        prev = None  # (turn, called a tool) of the assistant message just emitted
        for turn, msg in enumerate(messages):
            role = msg["role"]
            if role in TOOL_RESULT_ROLES:
                after_tool = turn > 0 and messages[turn - 1]["role"] in TOOL_RESULT_ROLES
                if not after_tool:
                    segs.append(self._role("<|observation|>", turn, prev))
                segs += self._tool_response(content_of(msg), turn)
            else:
                segs.append(self._role(f"<|{role}|>", turn, prev))
                if role == "user":
                    segs += self._user(content_of(msg), turn)
                elif role == "system":
                    segs.append(Segment(self.nl + content_of(msg), turn=turn))
                else:
                    segs += self._assistant(msg, turn, turn > last_user or bool(msg.get("keep_reasoning")))
            prev = (turn, bool(msg.get("tool_calls"))) if role == "assistant" else None
        if add_generation_prompt:
            segs.append(self._role("<|assistant|>", len(messages), prev))
            segs += self._prompt_tail(len(messages))
        elif add_eos and prev is not None:
            segs.append(Segment("<|observation|>" if prev[1] else "<|endoftext|>", special=True,
                                turn=prev[0], trained=True))
        return _joined(segs)

    @staticmethod
    def _role(token: str, turn: int, prev) -> Segment:
        """A role token; trained when it ends the assistant message before it (how the model stops)."""
        if prev is not None:
            return Segment(token, special=True, turn=prev[0], trained=True)
        return Segment(token, special=True, turn=turn)

    def _tool_segments(self, tools) -> list[Segment]:
        if not tools:
            return []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise InputError("a tool must be an object", field=f"tools[{i}]")
        # `tool | tojson(ensure_ascii=False)`: json.dumps with its default separators, one per line
        body = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
        # The format example names the tool-call tags: the model's tokenizer reads them as its special
        # tokens (they are template text, not user text), so they are segments of their own here too.
        pieces = [p for p in _CALL_TAG.split(self.tools_tail) if p]
        return [Segment("<|system|>", special=True), Segment(GLM45_TOOLS_HEAD + body + pieces[0]),
                *(Segment(p, special=bool(_CALL_TAG.fullmatch(p))) for p in pieces[1:])]

    def _user(self, content: str, turn: int) -> list[Segment]:
        return [Segment(self.nl + content, turn=turn)]

    def _assistant(self, msg: dict, turn: int, show_reasoning: bool) -> list[Segment]:
        reasoning, content = split_reasoning(msg)
        segs = self._thinking(reasoning.strip() if show_reasoning and reasoning else None, turn)
        if content.strip():
            segs.append(Segment(self.nl + content.strip(), turn=turn, trained=True))
        for j, call in enumerate(msg.get("tool_calls") or []):
            segs += self._tool_call(call, turn, f"messages[{turn}].tool_calls[{j}]")
        return segs

    def _tool_call(self, call: dict, turn: int, field: str) -> list[Segment]:
        """``<tool_call>NAME`` then ``<arg_key>K</arg_key><arg_value>V</arg_value>`` per argument (glm45:
        a newline before the call, after the name and after each tag pair)."""
        name, args = call_arguments(call, field)
        nl = self.nl

        def tok(t):
            return Segment(t, special=True, turn=turn, trained=True)

        def text(t):
            return Segment(t, turn=turn, trained=True)

        segs = [text(nl), tok("<tool_call>"), text(name + nl)]
        for key, value in args.items():
            segs += [tok("<arg_key>"), text(str(key)), tok("</arg_key>"), text(nl),
                     tok("<arg_value>"), text(arg_value_text(value)), tok("</arg_value>"), text(nl)]
        return segs + [tok("</tool_call>")]

    def _tool_response(self, content: str, turn: int) -> list[Segment]:
        nl = self.nl
        return [Segment(nl, turn=turn), Segment("<tool_response>", special=True, turn=turn),
                Segment(nl + content + nl, turn=turn), Segment("</tool_response>", special=True, turn=turn)]

    def _thinking(self, reasoning: str | None, turn: int) -> list[Segment]:
        raise NotImplementedError

    def _prompt_tail(self, turn: int) -> list[Segment]:
        raise NotImplementedError

    # -- reading the model's output back ---------------------------------------------------------------
    @property
    def starts_in_reasoning(self) -> bool:
        """Whether the generation prompt leaves the model inside ``<think>`` (glm47 with thinking on)."""
        return False

    def parse_output(self, text: str, tools: list | None = None) -> dict:
        from glmtune.templates.parse import parse_glm_output

        return parse_glm_output(text, starts_in_reasoning=self.starts_in_reasoning, tools=tools)

    def output_stream(self, tools: list | None = None):
        from glmtune.templates.parse import GLMStreamParser

        return GLMStreamParser(starts_in_reasoning=self.starts_in_reasoning, tools=tools)


def _joined(segs: list[Segment]) -> list[Segment]:
    """Adjacent text segments of one turn and mask as one, empty ones dropped: the tokenizer sees the
    text between two special tokens as one piece ("answer." + "\n" before a tool call encodes as ".\n")."""
    out: list[Segment] = []
    for seg in segs:
        if not seg.special and not seg.text:
            continue  # glm47's empty separators
        last = out[-1] if out else None
        if (last is not None and not seg.special and not last.special and last.turn == seg.turn
                and last.trained == seg.trained):
            out[-1] = Segment(last.text + seg.text, turn=seg.turn, trained=seg.trained)
        else:
            out.append(seg)
    return out


class GLM45Template(_GLM45Family):
    """GLM-4.5 / GLM-4.5-Air / GLM-4.6 (model_type glm4_moe): ``<|role|>\\n{content}``, ``\\n<think>…</think>``."""

    name = "glm45"

    def _user(self, content, turn):
        segs = [Segment("\n" + content, turn=turn)]
        if not self.enable_thinking and not content.endswith("/nothink"):
            segs.append(Segment("/nothink", special=True, turn=turn))
        return segs

    def _thinking(self, reasoning, turn):
        # With thinking off the generation prompt already holds an empty block: it is not the model's to write.
        trained = bool(reasoning) or self.enable_thinking
        return [Segment("\n", turn=turn, trained=trained), Segment("<think>", special=True, turn=turn, trained=trained),
                *([Segment(reasoning, turn=turn, trained=True)] if reasoning else []),
                Segment("</think>", special=True, turn=turn, trained=trained)]

    def _prompt_tail(self, turn):
        if self.enable_thinking:
            return []
        return [Segment("\n", turn=turn), Segment("<think>", special=True, turn=turn),
                Segment("</think>", special=True, turn=turn)]


class GLM47Template(_GLM45Family):
    """GLM-4.7 / GLM-4.7-Flash (glm4_moe, glm4_moe_lite): no newlines after role tokens, a lone
    ``</think>`` for earlier turns, the generation prompt ends in ``<think>``.

    ``clear_thinking=False`` (the official template's kwarg) renders every turn's reasoning."""

    name = "glm47"
    nl = ""
    tools_tail = GLM47_TOOLS_TAIL
    options = ("enable_thinking", "clear_thinking")

    def __init__(self, enable_thinking: bool = True, clear_thinking: bool = True):
        super().__init__(enable_thinking, clear_thinking=clear_thinking)

    def _assistant(self, msg, turn, show_reasoning):
        return super()._assistant(msg, turn, show_reasoning or not self.clear_thinking)

    def _thinking(self, reasoning, turn):
        if reasoning:  # the prompt ends in <think> (thinking on): the model writes from the reasoning on
            return [Segment("<think>", special=True, turn=turn, trained=not self.enable_thinking),
                    Segment(reasoning, turn=turn, trained=True), Segment("</think>", special=True, turn=turn, trained=True)]
        return [Segment("</think>", special=True, turn=turn, trained=self.enable_thinking)]

    def _prompt_tail(self, turn):
        return [Segment("<think>" if self.enable_thinking else "</think>", special=True, turn=turn)]

    @property
    def starts_in_reasoning(self) -> bool:
        return self.enable_thinking
