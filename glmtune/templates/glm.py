"""GLM-family templates: GLM-4 (glm-4-9b-chat, GLM-4-9B-0414), GLM-Z1 (GLM-Z1-9B/32B-0414), ChatGLM3, ChatGLM2.

GLM-4 and ChatGLM3 mark each message with a role token and end an assistant turn with the next
role token (or end-of-text), which is why that token is trained: it is how the model learns to stop.
Both generation prompts end at the bare ``<|assistant|>`` token, as in the official templates; the
model itself writes the metadata line (a tool name, usually empty) and the newline, so those are
trained together with the content, as in THUDM's own fine-tuning scripts.
"""
from __future__ import annotations

import ast
import json

from glmtune.errors import InputError
from glmtune.templates.base import Segment, Template, content_of, metadata_of, tool_call_parts
from glmtune.templates.glm45 import split_reasoning

GLM4_TOOL_SYSTEM = ("你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_HINT = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
# GLM-Z1-0414's tools preamble (its official chat template: tests/templates/official/glmz1_chat_template.jinja;
# the hint after each tool is GLM-4's).
GLMZ1_TOOL_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                     "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
# GLM-Z1's generation prompt ends `<|assistant|>` + this: the model always starts inside its thinking.
GLMZ1_THINK_OPEN = "\n<think>"
# ChatGLM3's tool demo system prompt, used when tools come without a system message.
CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"


def _role(msg: dict) -> str:
    """Canonical records may say 'tool'; GLM calls a tool result an 'observation'."""
    return "observation" if msg["role"] == "tool" else msg["role"]


class _RoleTokenTemplate(Template):
    """Shared walk for templates where every block starts with a role token.

    ``_blocks`` yields ``(turn, role, metadata, content)``; an assistant message with tool calls
    yields one block per call. The role token after an assistant block is that block's end token.
    """

    prefix: tuple[str, ...] = ()
    eos: str = ""
    metadata_line = True  # `<|assistant|>{metadata}\n{content}`: the model writes the metadata line

    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        segs = [Segment(t, special=True) for t in self.prefix] + self._tool_segments(tools)
        prev = None  # turn of the assistant block just emitted, if any
        for turn, role, meta, content in self._blocks(messages, tools):
            segs.append(_end_or_header(f"<|{role}|>", turn, prev))
            trained = role == "assistant"
            segs += self._body(meta, content, turn, trained)
            prev = turn if trained else None
        if add_generation_prompt:
            segs.append(_end_or_header("<|assistant|>", len(messages), prev))
        elif add_eos and prev is not None:
            segs.append(Segment(self.eos, special=True, turn=prev, trained=True))
        return segs

    def _tool_segments(self, tools) -> list[Segment]:
        return []

    def _blocks(self, messages, tools):
        for turn, msg in enumerate(messages):
            role = _role(msg)
            if role == "assistant" and msg.get("tool_calls"):
                if content_of(msg):
                    yield turn, role, metadata_of(msg), content_of(msg)
                for call in msg["tool_calls"]:
                    yield (turn, role, *self._tool_call(call))
            else:
                yield turn, role, metadata_of(msg), content_of(msg)

    def _tool_call(self, call: dict) -> tuple[str, str]:
        return tool_call_parts(call)

    def _body(self, meta, content, turn, trained) -> list[Segment]:
        raise NotImplementedError


def _end_or_header(token: str, turn: int, prev: int | None) -> Segment:
    """A role token; trained (as the previous assistant block's end) when one precedes it."""
    if prev is not None:
        return Segment(token, special=True, turn=prev, trained=True)
    return Segment(token, special=True, turn=turn)


class GLM4Template(_RoleTokenTemplate):
    """``[gMASK]<sop>`` then ``<|role|>{metadata}\\n{content}`` per message (official jinja template).

    As in the official template, messages with empty content are skipped. Tools become the
    official system block; a tool call is an assistant block ``<|assistant|>{name}\\n{arguments}``.
    """

    name = "glm4"
    prefix = ("[gMASK]", "<sop>")
    eos = "<|endoftext|>"
    stop_tokens = ("<|endoftext|>", "<|user|>", "<|observation|>")
    supports_tools = True

    def _blocks(self, messages, tools):
        for block in super()._blocks(messages, tools):
            if block[3]:
                yield block

    def _tool_segments(self, tools) -> list[Segment]:
        if not tools:
            return []
        text = "\n" + GLM4_TOOL_SYSTEM
        for i, tool in enumerate(tools):
            if tool.get("type") != "function" or "function" not in tool:
                raise InputError(f"tool type {tool.get('type')!r} is not supported",
                                 field=f"tools[{i}].type", fix="describe tools as type 'function'")
            fn = tool["function"]
            # As transformers renders the official template: trim_blocks eats one of its two
            # newlines before "##", and `tojson(indent=4)` is json.dumps(indent=4, no ASCII escapes).
            text += f"\n## {fn.get('name', '')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}"
            text += GLM4_TOOL_HINT
        return [Segment("<|system|>", special=True), Segment(text)]

    def _body(self, meta, content, turn, trained):
        return [Segment(f"{meta}\n{content}", turn=turn, trained=trained)]


class GLMZ1Template(_RoleTokenTemplate):
    """GLM-Z1-9B-0414 / GLM-Z1-32B-0414: the GLM-4-0414 layout with forced thinking (official jinja template).

    As the official template: every message but a system one shows ``content.split('</think>')[-1].strip()``
    (so reasoning is never rendered in the history), empty messages are kept, tools get their own
    ``<|system|>`` block, a tool call is ``<|assistant|>{name}\\n{arguments}`` and the generation prompt is
    ``<|assistant|>\\n<think>``: the model writes ``reasoning</think>answer``.

    That prompt is what the model continues, so the assistant message(s) ending a conversation (or one with
    ``keep_reasoning``) are written the way the model writes them there: ``\\n<think>`` (the prompt's, not
    trained) then ``{reasoning}</think>{answer}`` (trained; the reasoning may be empty). The official
    template cannot render such a turn (it drops the reasoning and the ``<think>``); every earlier turn,
    every generation prompt and every tool call renders exactly as it does, so a trained answer's context
    is the prompt the model is served.
    """

    name = "glmz1"
    prefix = ("[gMASK]", "<sop>")
    eos = "<|endoftext|>"
    stop_tokens = ("<|endoftext|>", "<|user|>", "<|observation|>")
    supports_tools = True
    metadata_line = False  # the generation prompt already holds the newline (and `<think>`)

    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        live = _live_turns(messages)
        segs = [Segment(t, special=True) for t in self.prefix] + self._tool_segments(tools)
        prev, called = None, False  # turn of the assistant block just emitted (if any), and whether it is a call
        for turn, role, meta, content in self._blocks(messages, tools):
            segs.append(_end_or_header(f"<|{role}|>", turn, prev))
            trained = role == "assistant"
            if trained and not meta and turn in live:
                segs += [Segment(GLMZ1_THINK_OPEN, turn=turn),
                         Segment(f"{live[turn]}</think>{content}", turn=turn, trained=True)]
            else:
                segs.append(Segment(f"{meta}\n{content}", turn=turn, trained=trained))
            prev, called = (turn if trained else None), bool(meta)
        if add_generation_prompt:
            segs += [_end_or_header("<|assistant|>", len(messages), prev),
                     Segment(GLMZ1_THINK_OPEN, turn=len(messages))]
        elif add_eos and prev is not None:  # a final tool call ends where the tool's result would start
            segs.append(Segment("<|observation|>" if called else self.eos, special=True, turn=prev, trained=True))
        return segs

    def _blocks(self, messages, tools):
        for turn, role, meta, content in super()._blocks(messages, tools):
            # the official `visible`: reasoning (up to the last `</think>`) and outer whitespace dropped
            yield turn, role, meta, content if role == "system" else content.split("</think>")[-1].strip()

    def _tool_segments(self, tools) -> list[Segment]:
        if not tools:
            return []
        text = "\n" + GLMZ1_TOOL_SYSTEM
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise InputError("a tool must be an object", field=f"tools[{i}]")
            fn = tool["function"] if tool.get("function") else tool  # as the template: `tool.function` or the tool
            # `tojson(indent=4, ensure_ascii=False)` is json.dumps with those arguments
            text += f"\n## {fn.get('name', '')}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}{GLM4_TOOL_HINT}"
        return [Segment("<|system|>", special=True), Segment(text)]

    def parse_output(self, text: str, tools: list | None = None) -> dict:
        from glmtune.templates.parse import parse_glm_output

        return parse_glm_output(text, starts_in_reasoning=True, tools=tools)

    def output_stream(self, tools: list | None = None):
        from glmtune.templates.parse import GLMStreamParser

        return GLMStreamParser(starts_in_reasoning=True, tools=tools)


def _live_turns(messages) -> dict[int, str]:
    """turn -> reasoning (stripped, maybe '') of the assistant messages a GLM-Z1 model writes after its
    thinking prompt: those that end the conversation (after its last non-assistant message), so their
    context is exactly the official prompt; any with ``keep_reasoning`` too. Earlier turns render as the
    official template renders them in the prompt (reasoning dropped)."""
    last_other = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    return {turn: split_reasoning(msg)[0].strip() for turn, msg in enumerate(messages)
            if msg["role"] == "assistant" and (turn > last_other or msg.get("keep_reasoning"))}


class ChatGLM3Template(_RoleTokenTemplate):
    """ChatGLM3: ``[gMASK]sop<|role|>{metadata}\\n {content}``.

    ChatGLM3's tokenizer encodes ``metadata + "\\n"`` and the content with separate
    sentencepiece calls; the space in the rendered ``\\n `` is the content's dummy-prefix ``▁``.
    """

    name = "chatglm3"
    prefix = ("[gMASK]", "sop")
    eos = "</s>"
    content_lead = " "  # rendered `\n {content}`: decoding gives the dummy-prefix space back
    stop_tokens = ("</s>", "<|user|>", "<|observation|>")
    supports_tools = True

    def _blocks(self, messages, tools):
        if tools and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": CHATGLM3_TOOL_SYSTEM}] + list(messages)
            shift = -1  # keep turn numbers equal to the caller's message indexes
        else:
            shift = 0
        for turn, role, meta, content in super()._blocks(messages, tools):
            if tools and turn == 0 and role == "system":
                # As ChatGLM3's build_chat_input: the tool list follows the system prompt as JSON.
                content += "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
            yield turn + shift, role, meta, content

    def _tool_call(self, call: dict) -> tuple[str, str]:
        """ChatGLM3 writes a call as ``name`` metadata and a ``tool_call(k=v)`` code block."""
        name, args = tool_call_parts(call)
        params = json.loads(args) if args.strip() else {}
        node = ast.Call(func=ast.Name(id="tool_call"), args=[],
                        keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in params.items()])
        return name, f"```python\n{ast.unparse(node)}\n```"

    def _body(self, meta, content, turn, trained):
        return [Segment(f"{meta}\n", turn=turn, trained=trained),
                Segment(f" {content}", turn=turn, trained=trained, encode_as=content)]


class ChatGLM2Template(Template):
    """ChatGLM2's ``build_prompt``: ``[Round i]\\n\\n问：{q}\\n\\n答：{a}``, prefix ``[gMASK]sop``.

    ChatGLM2 fine-tuning encodes the prompt and the answer separately and ends the answer with
    ``</s>``; with every turn trained, each answer is closed by ``</s>`` and the next round follows
    it directly. ChatGLM2 has no system role: a system message is put before the first question.
    """

    name = "chatglm2"
    stop_tokens = ("</s>",)

    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        segs = [Segment("[gMASK]", special=True), Segment("sop", special=True)]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        rounds = 0
        for turn, msg in enumerate(messages):
            role = msg["role"]
            if role == "system":
                continue
            if role == "user":
                rounds += 1
                query = f"{system}\n\n{msg['content']}" if system and rounds == 1 else msg["content"]
                segs.append(Segment(f"[Round {rounds}]\n\n问：{query}\n\n答：", turn=turn))
            elif role == "assistant":
                if turn == 0 or messages[turn - 1]["role"] != "user":
                    raise InputError("ChatGLM2 needs each assistant turn to answer a user turn",
                                     field=f"messages[{turn}].role")
                segs.append(Segment(msg["content"], turn=turn, trained=True))
                if add_eos or turn < len(messages) - 1:
                    segs.append(Segment("</s>", special=True, turn=turn, trained=True))
            else:
                raise InputError(f"ChatGLM2 has no '{role}' role", field=f"messages[{turn}].role",
                                 fix="use the chatglm3 or glm4 template for tool use")
        return segs
