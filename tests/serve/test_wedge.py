"""The server never wedges: after mass timeouts, mass disconnects and cancels during prefill it still
answers, and /health says whether the engine's loop is alive (issue 24: transformers' continuous
batching stopped answering for good after 32 timed-out streams)."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import LiveServer


@pytest.fixture(scope="module")
def random_predictor(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune import Predictor
    from glmtune.models.tiny import build_tiny_glm4
    return Predictor(build_tiny_glm4(tmp_path_factory.mktemp("random") / "glm4", glm4_tokenizer_dir))


def ask(content: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


async def stream_to_the_end(client, url: str) -> str:
    """A streaming request that outlives the server's timeout: returns the last event it got."""
    last = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=ask("hi", stream=True, max_tokens=2000)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                last = line
    return last


async def hang_up_after_first_chunk(client, url: str) -> None:
    async with client.stream("POST", f"{url}/v1/chat/completions", json=ask("hi", stream=True, max_tokens=2000)) as r:
        async for _ in r.aiter_lines():
            return


async def give_up_during_prefill(client, url: str) -> None:
    with pytest.raises(httpx.TimeoutException):
        await client.post(f"{url}/v1/chat/completions", json=ask("long " * 400, max_tokens=50), timeout=0.05)


async def abuse(url: str) -> list[str]:
    limits = httpx.Limits(max_connections=128)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        timed_out = await asyncio.gather(*[stream_to_the_end(client, url) for _ in range(32)])
        await asyncio.gather(*[hang_up_after_first_chunk(client, url) for _ in range(32)])
        await asyncio.gather(*[give_up_during_prefill(client, url) for _ in range(16)])
    return timed_out


def wait_until_idle(url: str, limit_s: float = 10) -> dict:
    """/health once no request is left in the server (or after ``limit_s``)."""
    deadline = time.time() + limit_s
    while httpx.get(f"{url}/health").json()["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    return httpx.get(f"{url}/health").json()


def test_mass_timeouts_disconnects_and_cancels_leave_it_answering(random_predictor):
    from glmtune.serve.app import create_app

    with LiveServer(create_app(random_predictor, model_name="tiny", timeout=1.0)) as server:
        last_events = asyncio.run(abuse(server.url))
        assert all('"timeout"' in e or "[DONE]" in e for e in last_events)
        health = wait_until_idle(server.url)
        assert health["status"] == "ok" and health["engine_alive"] is True
        assert health["waiting"] == 0 and health["engine_last_error"] is None
        for _ in range(3):
            r = httpx.post(f"{server.url}/v1/chat/completions", json=ask("hi", max_tokens=4), timeout=20)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
