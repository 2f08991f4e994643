"""Limits checked before any work (413 body, 400 prompt longer than the context), max_tokens capped
to the context left, and abandoned requests (disconnect, timeout; streaming or not) stopped at the
next token, on a random tiny GLM-4 (its answers never hit a stop token, so only limits end them)."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import LiveServer


@pytest.fixture(scope="module")
def random_predictor(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune import Predictor
    from glmtune.models.tiny import build_tiny_glm4
    model = build_tiny_glm4(tmp_path_factory.mktemp("random") / "glm4", glm4_tokenizer_dir,
                            overrides={"max_position_embeddings": 512})
    return Predictor(model)


@pytest.fixture(scope="module")
def live(random_predictor):
    from glmtune.serve.app import create_app
    with LiveServer(create_app(random_predictor, model_name="tiny", timeout=8, max_body=64 * 1024)) as server:
        yield server


def ask(content: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def in_flight(live) -> int:
    return httpx.get(f"{live.url}/health").json()["waiting"]


def wait_idle(live, seconds: float = 5) -> float:
    t0 = time.time()
    while in_flight(live):
        assert time.time() - t0 < seconds, "an abandoned request kept its place"
        time.sleep(0.02)
    return time.time() - t0


def test_huge_body_and_long_prompt_are_refused_fast(live):
    body = json.dumps(ask("字" * ((5 << 20) // 3)), ensure_ascii=False).encode()  # 5 MB, encoded before timing
    t0 = time.time()
    r = httpx.post(f"{live.url}/v1/chat/completions", content=body, timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]
    assert time.time() - t0 < 1
    t0 = time.time()
    r = httpx.post(f"{live.url}/v1/chat/completions", json=ask("hello " * 600), timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context is 512 tokens" in r.json()["error"]["message"] and time.time() - t0 < 1
    r = httpx.post(f"{live.url}/v1/chat/completions", json=ask("hi", max_tokens=4), timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_max_tokens_is_capped_to_the_context_left(live):
    r = httpx.post(f"{live.url}/v1/chat/completions", json=ask("hello " * 490, max_tokens=2000), timeout=30)
    body = r.json()
    used = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length" and used == 512


def test_disconnect_and_timeout_free_the_slot(live, random_predictor):
    # streaming: read one chunk, hang up
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=ask("hi", stream=True, max_tokens=400),
                      timeout=10) as s:
        next(s.iter_lines())
    assert wait_idle(live) < 2
    # non-streaming: the client gives up after 0.5 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/chat/completions", json=ask("hi", max_tokens=400), timeout=0.5)
    assert wait_idle(live) < 2
    # the server's own timeout stops the generation, not just the response: a server whose timeout
    # (0.3 s) is far shorter than 480 tokens take on any machine
    from glmtune.serve.app import create_app
    with LiveServer(create_app(random_predictor, model_name="tiny", timeout=0.3, max_body=64 * 1024)) as quick:
        r = httpx.post(f"{quick.url}/v1/chat/completions", json=ask("hi", max_tokens=480), timeout=20)
        assert r.status_code == 504
        assert wait_idle(quick) < 2
    t0 = time.time()
    r = httpx.post(f"{live.url}/v1/chat/completions", json=ask("hi", max_tokens=2), timeout=10)
    assert r.status_code == 200 and time.time() - t0 < 2
