"""Fixtures for serving tests: the trained tiny GLM-4 (shared with tests/infer) and live servers."""
from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from tiny_trained import trained_tiny_glm4  # noqa: E402  (one module, so the model is trained once)

API_KEY = "sk-glmtune-test"


@pytest.fixture(scope="session")
def trained_glm4_dir(tmp_path_factory, glm4_tokenizer_dir):
    return trained_tiny_glm4(tmp_path_factory.mktemp("trained"), glm4_tokenizer_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread of this process, on 127.0.0.1 at a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=None, backlog=256))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
