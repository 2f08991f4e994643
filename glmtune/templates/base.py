"""What every chat template shares: segments, token ids, loss masks.

A template turns a conversation into a list of :class:`Segment` s: special tokens (looked up by id,
never parsed out of text) and stretches of text (each encoded by a separate tokenizer call with no
special tokens added and special-token strings kept as plain text). Rendering joins the segment
texts; encoding joins the segment ids. Training prompts, evaluation prompts and serving prompts
all come from these same segments, so they cannot drift apart.

Segment boundaries sit where the model starts and stops generating (after the assistant header,
before the end-of-turn token), so a generation prompt is always a prefix of the training ids and
the trained tokens are exactly what the model must produce after that prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from glmtune.errors import InputError

IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch cross_entropy's ignore_index)
TRAIN_ON = ("all_assistant", "last_assistant", "everything")
ROLES = ("system", "user", "assistant", "observation", "tool")
# Where an image sits in a message's text (U+FFFC OBJECT REPLACEMENT CHARACTER): `encode_prompt`
# swaps each for that image's placeholder ids; `render` shows it as is.
IMAGE_MARK = "\ufffc"


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation.

    ``text`` is what it adds to the rendered string. ``special`` segments are one token, looked up
    by id. ``encode_as`` is the text given to the tokenizer when it differs from ``text`` (ChatGLM3
    renders `\\n content` but encodes `content` alone: the space is sentencepiece's dummy prefix).
    ``turn`` is the message index (-1 for prefixes), ``trained`` marks assistant output.
    """
    text: str
    special: bool = False
    turn: int = -1
    trained: bool = False
    encode_as: str | None = None


@dataclass
class Encoded:
    """Token ids and labels (``IGNORE_INDEX`` where not trained), aligned one to one.

    ``turn_spans`` holds ``(start, end)`` of every assistant turn's output (content and its end
    token), whether or not ``train_on`` trains it, so later stages can truncate at turn boundaries.
    """
    input_ids: list[int]
    labels: list[int]
    turn_spans: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def trained_spans(self) -> list[tuple[int, int]]:
        """Maximal ``(start, end)`` runs of trained positions."""
        spans, start = [], None
        for i, lab in enumerate(self.labels + [IGNORE_INDEX]):
            if lab != IGNORE_INDEX and start is None:
                start = i
            elif lab == IGNORE_INDEX and start is not None:
                spans.append((start, i))
                start = None
        return spans


class Template:
    """Base class: subclasses implement :meth:`segments` and set ``name`` and ``stop_tokens``."""

    name: str = ""
    stop_tokens: tuple[str, ...] = ()
    supports_tools: bool = False
    # The model writes a metadata line (a tool name, usually empty) and "\n" before an answer (GLM-4,
    # ChatGLM3): `answer_text` cuts an empty one. `content_lead`: text the rendering puts before the
    # content that decoding gives back (ChatGLM3's sentencepiece dummy-prefix space).
    metadata_line: bool = False
    content_lead: str = ""

    def segments(self, messages: list[dict], tools: list | None = None,
                 add_generation_prompt: bool = False, add_eos: bool = True) -> list[Segment]:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tools: list | None = None,
               add_generation_prompt: bool = False, add_eos: bool = False) -> str:
        """The exact text the model sees (what the official chat template renders).

        ``add_eos`` defaults to False here because official chat templates do not append the
        end-of-text token; :meth:`encode` appends it for training.
        """
        msgs = self.checked_messages(messages, tools)
        return "".join(s.text for s in self.segments(msgs, tools, add_generation_prompt, add_eos))

    def encode(self, tokenizer, messages: Sequence[dict], tools: list | None = None,
               train_on: str = "all_assistant", add_eos: bool = True) -> Encoded:
        """Token ids and labels for training: assistant outputs and their end tokens are trained."""
        if train_on not in TRAIN_ON:
            raise InputError(f"unknown train_on '{train_on}'", field="train_on",
                             fix=f"use one of {', '.join(TRAIN_ON)}")
        msgs = self.checked_messages(messages, tools)
        segs = self.segments(msgs, tools, False, add_eos)
        last = max((s.turn for s in segs if s.trained), default=None)
        ids, labels, spans = [], [], {}
        for seg in segs:
            seg_ids = segment_ids(tokenizer, seg)
            if seg.trained:
                start, _ = spans.get(seg.turn, (len(ids), 0))
                spans[seg.turn] = (start, len(ids) + len(seg_ids))
            train = (train_on == "everything" or
                     (seg.trained and (train_on == "all_assistant" or seg.turn == last)))
            ids += seg_ids
            labels += seg_ids if train else [IGNORE_INDEX] * len(seg_ids)
        return Encoded(ids, labels, [spans[t] for t in sorted(spans)])

    def encode_prompt(self, tokenizer, messages: Sequence[dict], tools: list | None = None,
                      image_ids: Sequence[list[int]] | None = None) -> list[int]:
        """Ids of a generation prompt: the conversation plus the next assistant header.

        ``image_ids``: for vision-language models, the ids of each image's placeholder (already
        expanded by the model's processor), spliced in order where content holds ``IMAGE_MARK``.
        """
        return [t for _, seg_ids in self.prompt_segments(tokenizer, messages, tools, image_ids) for t in seg_ids]

    def prompt_segments(self, tokenizer, messages: Sequence[dict], tools: list | None = None,
                        image_ids: Sequence[list[int]] | None = None) -> list[tuple[Segment, list[int]]]:
        """The generation prompt as (segment, its ids) pairs, in order: what `encode_prompt` joins.
        ``Segment.turn`` indexes ``messages`` (or is negative / past the end for template text)."""
        msgs = self.checked_messages(messages, tools)
        if msgs[-1]["role"] == "assistant":
            raise InputError("the conversation ends with an assistant turn", field="messages",
                             fix="drop the last assistant message to build the prompt for it")
        images = iter(image_ids) if image_ids is not None else None
        pairs = []
        for seg in self.segments(msgs, tools, True, False):
            if images is not None and not seg.special and IMAGE_MARK in seg.text:
                pairs.append((seg, _ids_with_images(tokenizer, seg, images)))
            else:
                pairs.append((seg, segment_ids(tokenizer, seg)))
        if images is not None and next(images, None) is not None:
            raise InputError("more images than image marks in the messages", field="messages")
        return pairs

    def answer_ids(self, tokenizer, messages: Sequence[dict], answer: str, tools: list | None = None,
                   prompt_ids: Sequence[int] | None = None) -> list[int]:
        """The ids the model must write after the generation prompt of ``messages`` to answer ``answer``:
        the trained tokens of that assistant turn (GLM: the metadata line too), end token included and
        nothing after it (ChatML's newline after ``<|im_end|>`` is not the model's to write).

        ``prompt_ids``: the prompt already encoded (saves encoding it again); checked to be the prefix."""
        enc = self.encode(tokenizer, [*messages, {"role": "assistant", "content": answer}], tools=tools,
                          train_on="last_assistant")
        spans = enc.trained_spans()
        if not spans:
            raise InputError(f"template {self.name!r} trains no token of the answer {answer!r}", field="template")
        start, end = spans[-1]
        prompt = self.encode_prompt(tokenizer, messages, tools) if prompt_ids is None else list(prompt_ids)
        if enc.input_ids[:start] != prompt:  # a template bug: training and generation would see different text
            raise InputError(f"template {self.name!r} renders the prompt differently inside the conversation",
                             field="template")
        return enc.input_ids[start:end]

    def answer_text(self, text: str, final: bool = True) -> str:
        """The answer in the decoded text a model generated after the prompt (stop token already cut).

        With ``metadata_line`` (GLM-4, ChatGLM3) the model first writes a metadata line (a tool name,
        usually empty) and a newline. Only an EMPTY metadata line is cut; a non-empty one (a tool call)
        or an answer without any newline is returned whole. So mid-stream (``final=False``) only leading
        whitespace without a newline yet is held back (it may still turn out to be the empty line): once
        a non-space character has come, the text is returned whole whatever follows, and streams.
        (Holding everything until the first newline froze the stream of a model that answers without the
        metadata line until generation ended.) ``content_lead`` (ChatGLM3's space) is then dropped."""
        if not self.metadata_line:
            return text
        meta, sep, content = text.partition("\n")
        if not sep:
            return text if final or text.strip() else ""
        if meta.strip():  # a tool call (`name\n{arguments}`): keep it whole for the caller to parse
            return text
        return content.removeprefix(self.content_lead)

    def variant(self, **options) -> "Template":
        """This template with some options replaced (GLM-4.5+: ``enable_thinking``); a family without
        options refuses any, naming it."""
        if options:
            key = next(iter(options))
            raise InputError(f"template '{self.name}' has no option '{key}'", field=key,
                             fix="enable_thinking / clear_thinking are options of the glm45 and glm47 templates")
        return self

    def parse_output(self, text: str, tools: list | None = None) -> dict:
        """The assistant message (OpenAI shape) in an answer's text (after :meth:`answer_text`):
        here the text is the content; GLM-4.5+ templates split off reasoning and tool calls."""
        return {"role": "assistant", "content": text}

    def output_stream(self, tools: list | None = None):
        """An incremental :meth:`parse_output` (``feed(piece)`` / ``finish()`` return OpenAI deltas),
        or None when the answer streams as plain content."""
        return None

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end generation: the template's end tokens present in this tokenizer."""
        ids = [_special_id(tokenizer, t, required=False) for t in self.stop_tokens]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # -- validation (glmtune.data.cutoff, which walks the segments itself, calls it too) -------
    def checked_messages(self, messages: Sequence[dict], tools: list | None) -> list[dict]:
        """The messages, checked for the shape a template relies on (roles, system first, string content,
        tools only where supported), content None as "". The data stage checks records more fully."""
        if not messages:
            raise InputError("a conversation needs at least one message", field="messages")
        if tools and not self.supports_tools:
            raise InputError(f"template '{self.name}' does not support tools", field="tools",
                             fix="use the glm4 or chatglm3 template, or drop the tools")
        out = []
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            if role not in ROLES:
                raise InputError(f"unknown role {role!r}", field=f"messages[{i}].role",
                                 fix=f"use one of {', '.join(ROLES)}")
            if role == "system" and i != 0:
                raise InputError("a system message may only come first", field=f"messages[{i}].role")
            content = msg.get("content")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise InputError("content must be a string", field=f"messages[{i}].content",
                                 fix="image parts are for inference with a vision-language model "
                                     "(Predictor, chat, serve); training on them is not supported")
            if msg.get("tool_calls") and not self.supports_tools:
                raise InputError(f"template '{self.name}' does not support tool calls",
                                 field=f"messages[{i}].tool_calls")
            out.append({**msg, "content": content})
        return out


def segment_ids(tokenizer, seg: Segment) -> list[int]:
    """The ids of one segment: a control token's id, or the text encoded without special tokens."""
    if seg.special:
        return [_special_id(tokenizer, seg.text)]
    text = seg.text if seg.encode_as is None else seg.encode_as
    if not text:
        return []
    # split_special_tokens: a user writing "[gMASK]" or "<|user|>" gets plain text, not a control token.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _ids_with_images(tokenizer, seg: Segment, images) -> list[int]:
    """A text segment's ids with each ``IMAGE_MARK`` replaced by the next image's placeholder ids.

    The text around a mark is tokenized on its own, as a user's text is everywhere else, so a
    picture never merges with neighbouring characters into one token."""
    ids: list[int] = []
    pieces = (seg.text if seg.encode_as is None else seg.encode_as).split(IMAGE_MARK)
    for i, piece in enumerate(pieces):
        ids += segment_ids(tokenizer, Segment(piece, turn=seg.turn))
        if i < len(pieces) - 1:
            placeholder = next(images, None)
            if placeholder is None:
                raise InputError("more image marks than images in the messages", field="messages")
            ids += placeholder
    return ids


def _special_id(tokenizer, token: str, required: bool = True) -> int | None:
    """Id of a special token; a missing one means the template does not fit the tokenizer."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        if not required:
            return None
        raise InputError(f"the tokenizer has no token {token!r}", field="template",
                         fix="check that the template family matches the model "
                             "(glmtune.json 'template' or --template)")
    return tid


def content_of(msg: dict) -> str:
    return msg.get("content") or ""


def metadata_of(msg: dict) -> str:
    """GLM's per-message metadata (a tool name on tool calls); absent or None renders as ''."""
    meta = msg.get("metadata")
    return "" if meta is None else str(meta)


def tool_call_parts(call: dict) -> tuple[str, str]:
    """(name, arguments text) of an OpenAI-style tool call; dict arguments become JSON."""
    import json

    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return str(fn.get("name", "")), args


