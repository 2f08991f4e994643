"""OpenAI chat-completions request/response shapes (the subset glmtune serves), validated by pydantic.

Unknown request fields are ignored, as OpenAI-compatible servers usually do, so newer clients work;
fields that would change the answer but are not supported (``n > 1``, ``stop``) are rejected with
400 rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None

    def to_canonical(self) -> dict:
        """A canonical glmtune message; OpenAI's 'developer' role is a system message."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        msg = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


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


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape; its client raises the matching APIStatusError subclass from it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
