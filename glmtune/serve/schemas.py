"""OpenAI chat-completions request/response shapes (the subset glmtune serves), validated by pydantic.

Unknown request fields are ignored, as OpenAI-compatible servers usually do, so newer clients work;
fields that would change the answer but are not supported (``n > 1``, ``stop``) are rejected with
400 rather than silently ignored. Content parts: ``text`` and ``image_url`` (a ``data:`` URI, or a
local path / ``file://`` URL inside the server's ``--image-root``; never fetched from the network).
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: str | None = None  # OpenAI's hint; sizing here is min_pixels/max_pixels or resized_*


class ImagePart(BaseModel):
    """OpenAI's image part, plus the per-image sizing keys glmtune's records take."""
    type: Literal["image_url"]
    image_url: ImageURL
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    resized_height: int | None = Field(None, ge=1)
    resized_width: int | None = Field(None, ge=1)

    def to_canonical(self, image_root: Path | None, field: str) -> dict:
        """A glmtune image part; a local path must lie inside ``image_root`` (none given: refused)."""
        from glmtune.errors import InputError
        from glmtune.infer.vision import local_image_path

        url = self.image_url.url
        if not url.startswith("data:"):
            if image_root is None:
                raise InputError("this server takes images only as data: URIs", field=field,
                                 fix="send data:image/png;base64,..., or start the server with --image-root DIR")
            url = str(local_image_path(url, root=image_root, field=field))
        sizing = self.model_dump(include={"min_pixels", "max_pixels", "resized_height", "resized_width"},
                                 exclude_none=True)
        return {"type": "image", "image": url, **sizing}


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    # list first: a bad part is then the error reported (a union reports its first branch's error)
    content: list[ContentPart] | str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # an earlier answer's thinking, as this server returned it
    tool_call_id: str | None = None
    name: str | None = None

    def to_canonical(self, image_root: Path | None = None, field: str = "messages") -> dict:
        """A canonical glmtune message; OpenAI's 'developer' role is a system message. Text-only
        parts join into one string; with images, content stays a list of glmtune parts."""
        content = self.content
        if isinstance(content, list) and not any(isinstance(p, ImagePart) for p in content):
            content = "".join(p.text for p in content)
        elif isinstance(content, list):
            content = [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                       else p.to_canonical(image_root, f"{field}.content[{j}].image_url.url")
                       for j, p in enumerate(content)]
        msg = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        return msg


def canonical_messages(messages: list[Message], image_root: Path | None = None) -> list[dict]:
    return [m.to_canonical(image_root, f"messages[{i}]") for i, m in enumerate(messages)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # None (not given) = greedy: glmtune's default is reproducible answers, unlike OpenAI's 1.0.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    # the chat template's options, as vLLM / SGLang take them: GLM-4.5+ {"enable_thinking": false},
    # glm47 also {"clear_thinking": false}; an option the model's template lacks is a 400 naming it
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop_strings(cls, v):
        if v:
            raise ValueError("stop sequences are not supported: generation ends on the model "
                             "template's stop tokens")
        return v

    def gen_kwargs(self, max_tokens_cap: int) -> dict:
        limit = self.max_completion_tokens or self.max_tokens or max_tokens_cap
        return {"max_new_tokens": min(limit, max_tokens_cap), "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, message: dict | str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A chat.completion; ``message``: the template's parse of the answer (``content``, and for GLM-4.5+
    ``reasoning_content`` / ``tool_calls``), or the answer text. A finished answer that calls tools ends
    with finish_reason ``tool_calls``, as OpenAI's do."""
    if isinstance(message, str):
        message = {"role": "assistant", "content": message}
    message = {k: v for k, v in message.items() if v is not None or k == "content"}
    if message.get("tool_calls"):
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in message["tool_calls"]]
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, created: int | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()) if created is None else created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def content_events(cid: str, model: str, created: int):
    """``piece -> 'data: {chunk with delta {"content": piece}}\n\n'``: the JSON around the piece is
    made once per stream and only the piece is encoded per event (a served token's event cost
    ~25 µs of dict building and json.dumps, for 64 streams a third of a decode step)."""
    import json

    marker = "\u0000glmtune\u0000"
    whole = json.dumps(chunk(cid, model, {"content": marker}, created=created), ensure_ascii=False)
    head, tail = whole.split(json.dumps(marker, ensure_ascii=False))
    head, tail = "data: " + head, tail + "\n\n"
    return lambda piece: head + json.dumps(piece, ensure_ascii=False) + tail


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape; its client raises the matching APIStatusError subclass from it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
