"""An OpenAI-compatible server on 127.0.0.1 whose replies a test scripts: ``respond(messages) -> str``.

Used by the synthesis and augmentation tests to assert exactly what is kept, retried and dropped.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable

from local_site import LocalServer


class FakeLLM(LocalServer):
    """``with FakeLLM(respond) as llm: llm.url ('.../v1'), llm.calls (message lists), llm.auth``."""

    def __init__(self, respond: Callable[[list[dict]], str], model: str = "fake-model"):
        self.calls: list[list[dict]] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self._json({"object": "list", "data": [{"id": model, "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls.append(body["messages"])
                    fake.auth.append(self.headers.get("Authorization"))
                reply = respond(body["messages"])
                self._json({"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}]})

            def _json(self, obj):
                data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._start(Handler)
        self.url = f"http://127.0.0.1:{self.port}/v1"


def prompt_text(messages: list[dict]) -> str:
    """The first user message: the filled prompt template."""
    return next(m["content"] for m in messages if m["role"] == "user")
