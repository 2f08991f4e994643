"""`glmtune serve` with the engine in its own process: the wedge test's abuse leaves it answering,
and a dead engine process makes /health say 503 and requests fail at once instead of hanging."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from conftest import LiveServer
from test_wedge import abuse, ask, wait_until_idle


@pytest.fixture(scope="module")
def remote_random_predictor(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune import Predictor
    from glmtune.models.tiny import build_tiny_glm4

    p = Predictor(build_tiny_glm4(tmp_path_factory.mktemp("random") / "glm4", glm4_tokenizer_dir),
                  backend="hf-process")
    yield p
    p.close()


def test_abuse_then_a_dead_engine_process(remote_random_predictor):
    from glmtune.serve.app import create_app

    with LiveServer(create_app(remote_random_predictor, model_name="tiny", timeout=1.0)) as server:
        last_events = asyncio.run(abuse(server.url))
        assert all('"timeout"' in e or "[DONE]" in e for e in last_events)
        health = wait_until_idle(server.url)
        assert health["engine_alive"] is True and health["waiting"] == 0
        r = httpx.post(f"{server.url}/v1/chat/completions", json=ask("hi", max_tokens=4), timeout=20)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        stream = httpx.post(f"{server.url}/v1/chat/completions", json=ask("hi", max_tokens=3, stream=True), timeout=20)
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")

        os.kill(remote_random_predictor.backend.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while httpx.get(f"{server.url}/health").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["engine_alive"] is False
        assert "exited" in health.json()["engine_last_error"]
        started = time.time()
        r = httpx.post(f"{server.url}/v1/chat/completions", json=ask("hi", max_tokens=4), timeout=20)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped" and time.time() - started < 5
        assert "exited" in r.json()["error"]["message"]
