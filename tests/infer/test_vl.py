"""Images in records, Predictor (1 and 2 images, history, streaming, batches), `glmtune predict` and
`glmtune chat /image` on a tiny random LLaVA(Qwen2 + SigLIP) folder; bad pictures are one-line errors."""
from __future__ import annotations

import json

import pexpect
import pytest
from test_chat_cli import PROMPT, spawn
from vl_helpers import data_uri, write_picture

from glmtune.data.records import validate_record
from glmtune.errors import InputError
from glmtune.infer.vision import ImageLimits, load_images, sized

N = 6  # new tokens per answer: enough to tell answers apart, cheap on 2 cores


@pytest.fixture(scope="module")
def vl(tiny_vl_dir):
    from glmtune import Predictor
    return Predictor(tiny_vl_dir, max_new_tokens=N)


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pics")
    return [write_picture(folder / f"p{i}.png", seed=i) for i in range(3)]


def image(path, **sizing):
    return {"type": "image", "image": str(path), **sizing}


def text(t):
    return {"type": "text", "text": t}


def test_records_take_parts_and_refuse_bad_ones():
    ok = {"messages": [{"role": "user", "content": [image("a.png", max_pixels=4096), text("what?")]},
                       {"role": "assistant", "content": "a cat"}]}
    assert validate_record(ok) is ok
    bad = [([{"type": "image", "image": "https://x.org/a.png"}], "never fetched"),
           ([{"type": "audio", "audio": "a.wav"}], "unknown content part"),
           ([image("a.png", resized_height=28)], "go together"),
           ([image("a.png", max_pixels=0)], "positive integer"),
           ([text("  ")], "empty user turn")]
    for content, problem in bad:
        rec = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]}
        with pytest.raises(InputError, match=problem) as err:
            validate_record(rec, file="d.jsonl", line=3)
        assert str(err.value).startswith("d.jsonl:3: field 'messages[0].content")


def test_prompt_ids_equal_the_models_own_processor(vl, pics):
    """Our template + spliced placeholders == the model's chat template run through its processor."""
    content = [image(pics[0]), text("What is in the picture?")]
    prompt = vl.prompt_ids([{"role": "user", "content": content}])
    proc = vl.vision.processor
    rendered = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, content[1]]}],
                                        tokenize=False, add_generation_prompt=True)
    from PIL import Image
    ref = proc(text=[rendered], images=[Image.open(pics[0]).convert("RGB")], add_special_tokens=False,
               return_tensors="pt")
    assert list(prompt) == ref["input_ids"][0].tolist()
    assert prompt.count(proc.image_token_id) == 729  # (384 / 14)^2 SigLIP patches
    assert prompt.inputs["pixel_values"].shape == (1, 3, 384, 384)
    assert (prompt.inputs["pixel_values"] == ref["pixel_values"]).all()
    assert prompt.unexpanded_ids.count(proc.image_token_id) == 1  # vLLM expands it itself


def test_one_image_reaches_the_model(vl, pics):
    answers = [vl([image(p), text("Describe it.")]) for p in pics]
    assert len(set(answers)) == 3, answers  # the picture changes the greedy answer
    assert vl([image(pics[0]), text("Describe it.")]) == answers[0]  # and greedy is reproducible
    assert vl([image(f"file://{pics[0]}"), text("Describe it.")]) == answers[0]
    assert vl([{"type": "image", "image": data_uri(pics[0])}, text("Describe it.")]) == answers[0]


def test_two_images_history_and_streaming(vl, pics):
    two = [image(pics[0]), text("and"), image(pics[1]), text("compare them")]
    answer = vl(two)
    assert "".join(vl.stream(two)) == answer
    assert vl([image(pics[0]), text("and"), image(pics[2]), text("compare them")]) != answer
    prompt = vl.prompt_ids([{"role": "user", "content": two}])
    assert prompt.inputs["pixel_values"].shape[0] == 2
    # An image earlier in the conversation is still seen.
    history = [{"role": "user", "content": [image(pics[1]), text("hi")]}, {"role": "assistant", "content": "ok"}]
    other = [{"role": "user", "content": [image(pics[2]), text("hi")]}, {"role": "assistant", "content": "ok"}]
    assert vl("and now?", history=history) != vl("and now?", history=other)
    # A batch mixing pictures and text answers as one call each (left padding, pixel rows in order).
    items = [[{"role": "user", "content": two}], "plain text", [{"role": "user", "content": [image(pics[2]), text("x")]}]]
    assert vl.batch(items, batch_size=3) == [vl(two), vl("plain text"), vl([image(pics[2]), text("x")])]


def test_sizing_options(pics):
    from PIL import Image

    img = Image.open(pics[0])  # 80 x 60
    assert sized(img, {"resized_height": 28, "resized_width": 56}).size == (56, 28)
    assert sized(img, {"max_pixels": 1200}).size == (40, 30)
    assert sized(img, {"min_pixels": 19200}).size == (160, 120)
    assert sized(img, {"max_pixels": 10**6}).size == (80, 60)


def test_bad_pictures_are_one_line_errors(vl, pics, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [(image(tmp_path / "missing.png"), "image not found"),
             (image(not_image), "not a readable image"),
             ({"type": "image", "image": "data:image/png;base64,@@@"}, "not valid base64"),
             ({"type": "image", "image": "s3://bucket/a.png"}, "never fetched")]
    for part, problem in cases:
        with pytest.raises(InputError, match=problem) as err:
            vl([text("look"), part])
        assert "messages[0].content[1]" in str(err.value) and "\n" not in str(err.value)
    small = ImageLimits(max_bytes=1000, max_pixels=10**6, max_images=2)
    with pytest.raises(InputError, match="MiB, more than the limit"):
        load_images([image(pics[0])], small)  # a 14 kB PNG
    with pytest.raises(InputError, match="pixels, more than the limit"):
        load_images([image(pics[0])], ImageLimits(max_pixels=4000))
    with pytest.raises(InputError, match="3 images in one prompt"):
        load_images([image(pics[0])] * 3, small)
    assert vl([image(pics[0]), text("Describe it.")])  # the predictor still works


def test_text_only_model_names_the_record(random_glm4_dir, pics, tmp_path):
    from glmtune import Predictor
    from glmtune.infer.predict import predict_file

    p = Predictor(random_glm4_dir, max_new_tokens=2)
    with pytest.raises(InputError, match="text-only model") as err:
        p([text("hi"), image(pics[0])])
    assert "messages[0].content" in str(err.value)
    assert p([text("hi "), text("there")]) == p("hi there")  # text parts alone are fine
    data = tmp_path / "test.jsonl"
    rows = [{"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": [image(pics[0]), text("q")]},
                          {"role": "assistant", "content": "b"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="text-only") as err:
        predict_file(p, data, tmp_path / "preds.jsonl")
    assert str(err.value).startswith(f"{data}:2: field 'messages[0].content'")
    assert not (tmp_path / "preds.jsonl").exists() or not (tmp_path / "preds.jsonl").read_text()


def test_chat_image_command(tiny_vl_dir, vl, pics, tmp_path):
    child = spawn(["chat", "--model", str(tiny_vl_dir), "--max-new-tokens", str(N)])

    def answer_to(line: str) -> str:
        child.sendline(line)
        child.expect_exact("glm> ")
        child.expect_exact("\r\n" + PROMPT)
        return child.before.replace("\r\n", "\n")

    try:
        child.expect_exact(PROMPT)
        child.sendline(f"/image {tmp_path / 'missing.png'}")
        child.expect_exact("(error: ")
        child.expect_exact("image not found")
        child.expect_exact(PROMPT)
        child.sendline(f"/image {pics[1]}")
        child.expect_exact("(image 1 attached to your next message)")
        child.expect_exact(PROMPT)
        first = answer_to("Describe it.")
        assert first == vl([image(pics[1]), text("Describe it.")])
        # History keeps the picture: the follow-up is answered with it in view.
        history = [{"role": "user", "content": [image(pics[1]), text("Describe it.")]},
                   {"role": "assistant", "content": first}]
        assert answer_to("More?") == vl("More?", history=history)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
