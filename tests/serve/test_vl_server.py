"""`glmtune serve` with a vision-language model and the real openai client: image_url parts as data:
URIs or paths under --image-root, streaming; bad pictures are 400s and the server keeps serving."""
from __future__ import annotations

import openai
import pytest
from vl_helpers import data_uri, write_picture

from conftest import API_KEY, LiveServer

N = 6


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-root")
    return [write_picture(root / f"p{i}.png", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def vl(tiny_vl_dir):
    from glmtune import Predictor
    return Predictor(tiny_vl_dir, max_new_tokens=N)


@pytest.fixture(scope="module")
def client(vl, pics):
    from glmtune.serve.app import create_app

    with LiveServer(create_app(vl, api_key=API_KEY, timeout=120, model_name="tiny-vl",
                               image_root=pics[0].parent)) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def ask(client, url: str, stream: bool = False, **part):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}, **part},
                                             {"type": "text", "text": "Describe it."}]}]
    resp = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=N, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in resp if c.choices)
    return resp.choices[0].message.content


def test_data_uri_image_answers_like_predictor(client, vl, pics):
    want = [vl([{"type": "image", "image": str(p)}, {"type": "text", "text": "Describe it."}]) for p in pics]
    assert want[0] != want[1]  # the picture reaches the model
    assert ask(client, data_uri(pics[0])) == want[0]
    assert ask(client, data_uri(pics[1])) == want[1]
    assert ask(client, data_uri(pics[1]), stream=True) == want[1]
    assert ask(client, str(pics[0])) == want[0]  # a path inside --image-root
    assert ask(client, f"file://{pics[1]}") == want[1]
    assert ask(client, pics[1].name) == want[1]  # relative paths start at --image-root


def test_bad_images_are_400_and_the_server_keeps_serving(client, vl, pics, tmp_path):
    outside = write_picture(tmp_path / "outside.png", seed=5)
    not_image = pics[0].parent / "notes.png"
    not_image.write_text("not a picture")
    cases = [(str(outside), "outside the allowed image folder"),
             (f"{pics[0].parent}/../{outside.parent.name}/outside.png", "outside the allowed image folder"),
             (str(pics[0].parent / "missing.png"), "image not found"),
             (str(not_image), "not a readable image"),
             ("https://example.com/cat.png", "never fetched"),
             ("data:image/png;base64,!!", "not valid base64")]
    for url, problem in cases:
        with pytest.raises(openai.BadRequestError, match=problem):
            ask(client, url)
    with pytest.raises(openai.BadRequestError, match="positive|greater"):
        ask(client, data_uri(pics[0]), max_pixels=0)
    assert ask(client, data_uri(pics[0])) == vl([{"type": "image", "image": str(pics[0])},
                                                 {"type": "text", "text": "Describe it."}])


def test_text_only_model_refuses_images(trained_glm4_dir, pics):
    from glmtune import Predictor
    from glmtune.serve.app import create_app

    text_only = Predictor(trained_glm4_dir, max_new_tokens=2)  # shared with the other serve tests
    with LiveServer(create_app(text_only, model_name="tiny")) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="text-only model"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(pics[0])}}, {"type": "text", "text": "hi"}]}])
        # Without --image-root a path is refused before anything is read.
        with pytest.raises(openai.BadRequestError, match="only as data: URIs"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(pics[0])}}]}])
        ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert ok.choices[0].finish_reason in ("stop", "length")
