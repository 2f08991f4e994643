"""Chat LLM clients for stages that ask a model to write text (data synthesis, augmentation, judging).

Both clients are callables ``messages -> reply text`` with a ``batch(list_of_messages) -> replies``
method, so a caller never branches on where the model lives:

- :class:`OpenAIChatClient`: any OpenAI-compatible endpoint (`glmtune serve`, vLLM, hosted GLM
  APIs) over httpx; the key comes from an environment variable, never from a command line where
  it would land in shell history. ``batch`` runs requests in threads (the work is waiting on HTTP).
- :class:`LocalChatLLM`: a local model folder through :class:`glmtune.infer.Predictor`, batched.

:func:`open_llm` picks one from a string: ``http(s)://...`` is an endpoint, anything else a folder.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

from glmtune.errors import GlmtuneError, InputError

# Checked in this order; GLMTUNE_LLM_API_KEY first so a user's OpenAI key is never sent to another host by accident.
API_KEY_ENVS = ("GLMTUNE_LLM_API_KEY", "OPENAI_API_KEY")


class ChatLLM(Protocol):
    """What synthesis and augmentation need from a model: one reply per conversation."""
    name: str

    def __call__(self, messages: list[dict]) -> str: ...

    def batch(self, conversations: Sequence[list[dict]]) -> list[str]: ...


class OpenAIChatClient:
    """POST {url}/chat/completions; ``model=None`` takes the first id of GET {url}/models."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 0.0, max_tokens: int = 256, workers: int = 4):
        import httpx

        base = url.rstrip("/")
        self.base = base[: -len("/chat/completions")] if base.endswith("/chat/completions") else base
        self.endpoint = self.base + "/chat/completions"
        self.temperature, self.max_tokens, self.workers = temperature, max_tokens, workers
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.model = model or self._first_model()
        self.name = self.model

    def _first_model(self) -> str:
        resp = self.client.get(self.base + "/models")
        self._check(resp)
        models = [m.get("id") for m in resp.json().get("data", [])]
        if not models:
            raise GlmtuneError(f"{self.base}/models lists no model. Fix: pass --model NAME")
        return models[0]

    def _check(self, resp) -> None:
        if resp.status_code in (401, 403, 404):
            # Every later request would fail the same way: stop now with what to fix.
            raise GlmtuneError(f"LLM endpoint {resp.request.url} answered HTTP {resp.status_code}: "
                               f"{resp.text[:200]}. Fix: check the URL (it should end in /v1), the model "
                               f"name and the API key (${API_KEY_ENVS[0]})")
        resp.raise_for_status()

    def __call__(self, messages: list[dict]) -> str:
        resp = self.client.post(self.endpoint, json={"model": self.model, "messages": messages,
                                                     "temperature": self.temperature, "max_tokens": self.max_tokens})
        self._check(resp)
        return resp.json()["choices"][0]["message"]["content"] or ""

    def batch(self, conversations: Sequence[list[dict]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(self, conversations))

    def close(self) -> None:
        self.client.close()


class LocalChatLLM:
    """A model folder answered through Predictor (greedy unless temperature > 0), ``batch_size`` at a time."""

    def __init__(self, model_dir: str | Path, temperature: float = 0.0, max_tokens: int = 256,
                 batch_size: int = 8, **predictor_kwargs):
        from glmtune.infer.predictor import Predictor

        self.predictor = Predictor(model_dir, max_new_tokens=max_tokens, **predictor_kwargs)
        self.name = Path(model_dir).name
        self.gen = {"temperature": temperature} if temperature > 0 else {}
        self.batch_size = batch_size

    def __call__(self, messages: list[dict]) -> str:
        return self.predictor.chat(messages, **self.gen)

    def batch(self, conversations: Sequence[list[dict]]) -> list[str]:
        return self.predictor.batch(list(conversations), batch_size=self.batch_size, **self.gen)

    def close(self) -> None:
        pass


def api_key_from_env(name: str | None = None) -> str | None:
    """The key in $name when given, else the first of API_KEY_ENVS that is set."""
    names = (name,) if name else API_KEY_ENVS
    return next((os.environ[k] for k in names if os.environ.get(k)), None)


def open_llm(spec: str | Path, model: str | None = None, *, temperature: float = 0.0, max_tokens: int = 256,
             batch_size: int = 8, timeout: float = 120.0,
             api_key_env: str | None = None) -> OpenAIChatClient | LocalChatLLM:
    """``http(s)://host/v1`` -> OpenAIChatClient (key from ``api_key_env``, else $GLMTUNE_LLM_API_KEY or
    $OPENAI_API_KEY); a model folder -> LocalChatLLM. ``batch_size`` is the thread count for an endpoint."""
    text = str(spec)
    if text.startswith(("http://", "https://")):
        return OpenAIChatClient(text, model, api_key=api_key_from_env(api_key_env), timeout=timeout,
                                temperature=temperature,
                                max_tokens=max_tokens, workers=batch_size)
    if not Path(text).is_dir():
        raise InputError(f"--llm {text!r} is neither an http(s) URL nor a model folder", field="llm",
                         fix="pass an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1, or a local "
                             "model folder")
    return LocalChatLLM(text, temperature=temperature, max_tokens=max_tokens, batch_size=batch_size)
