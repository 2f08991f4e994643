"""Bounded queue (429 when full), per-request timeouts (504), and a responsive event loop,
checked with a stand-in predictor whose generation waits until the test lets it go."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import LiveServer
from glmtune.infer.backends import Output


class GatedPredictor:
    """Duck-types what the server uses; each generation blocks until ``gate`` is set."""

    model_dir = "gated"
    adapters: list[str] = []

    def __init__(self):
        from glmtune.templates import get_template

        self.gate, self.started, self.cancelled = threading.Event(), threading.Event(), 0
        self.template = get_template("glm4")  # the server reads answers back with the model's template

    def prepare(self, messages, tools=None, template=None):
        return [1, 2, 3], []

    def generate_stream(self, prompt_ids, on_text, adapter=None, cancel=None, **gen):
        self.started.set()
        while not self.gate.wait(0.01):
            if cancel.is_set():
                self.cancelled += 1
                return "", Output([], "cancelled")
        on_text("ok")
        return "ok", Output([7], "stop")


BODY = {"model": "gated", "messages": [{"role": "user", "content": "hi"}]}


def test_queue_full_gives_429_and_loop_stays_responsive():
    from glmtune.serve.app import create_app

    pred = GatedPredictor()
    with LiveServer(create_app(pred, max_queue=2, timeout=30)) as live, ThreadPoolExecutor(8) as pool:
        post = lambda: httpx.post(f"{live.url}/v1/chat/completions", json=BODY, timeout=30)  # noqa: E731
        running = pool.submit(post)
        assert pred.started.wait(10)  # one request is generating ...
        waiting = [pool.submit(post) for _ in range(2)]  # ... two fill the queue
        deadline = time.time() + 10
        while httpx.get(f"{live.url}/health").json()["waiting"] < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        t0 = time.time()
        r = httpx.post(f"{live.url}/v1/chat/completions", json=BODY)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert time.time() - t0 < 2, "the event loop must not wait for generation"
        pred.gate.set()
        for fut in [running, *waiting]:
            assert fut.result().json()["choices"][0]["message"]["content"] == "ok"


def test_timeout_gives_504_and_stops_generation():
    from glmtune.serve.app import create_app

    pred = GatedPredictor()
    with LiveServer(create_app(pred, max_queue=4, timeout=0.5)) as live:
        r = httpx.post(f"{live.url}/v1/chat/completions", json=BODY, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        # Streaming: headers are already sent, so the timeout arrives as an error event.
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json={**BODY, "stream": True},
                          timeout=10) as s:
            text = "".join(s.iter_text())
        assert s.status_code == 200 and '"timeout_error"' in text and text.endswith("data: [DONE]\n\n")
        deadline = time.time() + 5
        while pred.cancelled < 2:
            assert time.time() < deadline, "timed-out generations must be cancelled"
            time.sleep(0.02)
