"""`glmtune serve` app with the real openai client: sync, async, streaming, 64 concurrent streams,
adapters by model name, and 4xx (never 500) for bad requests."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from conftest import API_KEY, LiveServer
from tiny_trained import QA, SYSTEM_QA


@pytest.fixture(scope="module")
def adapter_dir(trained_glm4_dir, tmp_path_factory):
    """A random non-zero LoRA on the trained model, so its answers differ from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loading import load_model

    torch.manual_seed(3)
    model = get_peft_model(load_model(trained_glm4_dir, dtype="float32"),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "noisy"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def predictor(trained_glm4_dir, adapter_dir):
    from glmtune import Predictor

    p = Predictor(trained_glm4_dir, adapter={"noisy": adapter_dir}, max_new_tokens=24)
    p.default_adapter = None  # as `glmtune serve`: requests pick adapters by model name
    return p


@pytest.fixture(scope="module")
def server(predictor):
    from glmtune.serve.app import create_app

    with LiveServer(create_app(predictor, api_key=API_KEY, max_queue=128, timeout=60,
                               model_name="tiny")) as live:
        yield live


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def user(q):
    return [{"role": "user", "content": q}]


def test_sync_client_answers_like_predictor(client, predictor):
    for q, a in QA:
        r = client.chat.completions.create(model="tiny", messages=user(q), temperature=0)
        assert r.choices[0].message.content == predictor(q) == a
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
    system, q, a = SYSTEM_QA
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system}] + user(q))
    assert r.choices[0].message.content == a


def test_streaming_client(client, predictor):
    stream = client.chat.completions.create(model="tiny", messages=user("你好"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == predictor("你好") == QA[2][1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1


def test_async_client(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        r = await aclient.chat.completions.create(model="tiny", messages=user(QA[1][0]))
        pieces = []
        async for chunk in await aclient.chat.completions.create(model="tiny", messages=user(QA[3][0]),
                                                                 stream=True):
            pieces.append(chunk.choices[0].delta.content or "")
        await aclient.close()
        return r.choices[0].message.content, "".join(pieces)

    assert asyncio.run(main()) == (QA[1][1], QA[3][1])


def test_64_concurrent_streams(server):
    async def one(aclient, i):
        q, a = QA[i % len(QA)]
        text = ""
        async for chunk in await aclient.chat.completions.create(model="tiny", messages=user(q), stream=True,
                                                                 max_tokens=24):
            text += chunk.choices[0].delta.content or ""
        return text, a

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=100)))
        results = await asyncio.gather(*(one(aclient, i) for i in range(64)), return_exceptions=True)
        await aclient.close()
        return results

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(text == expected for text, expected in results)


def test_model_field_selects_adapter(client, predictor):
    models = [m.id for m in client.models.list()]
    assert models == ["tiny", "noisy"]
    q = QA[0][0]
    r = client.chat.completions.create(model="noisy", messages=user(q), max_tokens=8)
    assert r.choices[0].message.content == predictor(q, adapter="noisy", max_new_tokens=8) != QA[0][1]
    assert client.chat.completions.create(model="base", messages=user(q)).choices[0].message.content == QA[0][1]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=user(q))


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=user("hi"))
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": user("hi")})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # Auth comes first: a malformed body with a bad key is still 401.
    assert httpx.post(f"{server.url}/v1/chat/completions", content=b"{oops").status_code == 401
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


BAD_BODIES = [
    b"{not json",
    b"[]",
    b'"just a string"',
    b"{}",
    b'{"model": "tiny"}',
    b'{"model": "tiny", "messages": []}',
    b'{"model": "tiny", "messages": "hello"}',
    b'{"model": "tiny", "messages": [{"content": "no role"}]}',
    b'{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": 42}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["x"]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes please"}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}',
    b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_requests_get_400_in_openai_shape(server, body):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=user("hi"), temperature=7)


def test_unknown_route_is_404_in_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and "error" in r.json()
