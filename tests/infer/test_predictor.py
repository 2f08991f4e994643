"""Predictor on a tiny trained GLM-4: answers, history, system, streaming, batches, adapters."""
from __future__ import annotations

import pytest

from glmtune.errors import GlmtuneError, ModelNotFoundError
from tiny_trained import QA, SYSTEM_QA


def test_answers_what_it_was_trained_on(trained_predictor):
    for q, a in QA:
        assert trained_predictor(q) == a


def test_system_and_history_reach_the_prompt(trained_predictor):
    system, q, a = SYSTEM_QA
    assert trained_predictor(q, system=system) == a
    assert trained_predictor(QA[1][0], history=[QA[0]]) == QA[1][1]
    assert trained_predictor.chat([{"role": "user", "content": QA[0][0]}]) == QA[0][1]


def test_stream_pieces_join_to_the_answer(trained_predictor):
    pieces = list(trained_predictor.stream("你好"))
    assert len(pieces) > 1 and "".join(pieces) == "你好！我是一个小模型。"
    assert all("\ufffd" not in p for p in pieces)  # no half characters


def test_batch_equals_one_by_one(trained_predictor):
    questions = [q for q, _ in QA] + [QA[0][0]]
    assert trained_predictor.batch(questions, batch_size=3) == [a for _, a in QA] + [QA[0][1]]
    record = {"messages": [{"role": "user", "content": QA[2][0]}]}
    assert trained_predictor.batch([record]) == [QA[2][1]]


def test_stops_on_template_stop_token_not_length(trained_predictor):
    text, out = trained_predictor.generate(trained_predictor.prompt_ids(
        trained_predictor.messages_for(QA[0][0])))
    assert out.finish_reason == "stop" and text == QA[0][1]
    _, short = trained_predictor.generate(trained_predictor.prompt_ids(
        trained_predictor.messages_for(QA[0][0])), max_new_tokens=2)
    assert short.finish_reason == "length" and len(short.token_ids) == 2


@pytest.fixture(scope="module")
def two_adapters(random_glm4_dir, tmp_path_factory):
    """Two random (non-zero) LoRA adapters saved like training saves them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loading import load_model

    dirs = {}
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(10 + i)
        model = get_peft_model(load_model(random_glm4_dir, dtype="float32"),
                               LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False))
        dirs[name] = tmp_path_factory.mktemp("adapters") / name
        model.save_pretrained(dirs[name])
    return dirs


def test_adapters_are_chosen_per_call(random_glm4_dir, two_adapters):
    from glmtune import Predictor

    gen = {"max_new_tokens": 6}
    q = "Tell me something."
    multi = Predictor(random_glm4_dir, adapter=two_adapters)
    assert multi.adapters == ["alpha", "beta"] and multi.default_adapter == "alpha"
    base = Predictor(random_glm4_dir)(q, **gen)
    only_beta = Predictor(random_glm4_dir, adapter=two_adapters["beta"])(q, **gen)
    answers = {name: multi(q, adapter=name, **gen) for name in ("alpha", "beta", "base")}
    assert answers["base"] == base
    assert answers["beta"] == only_beta
    assert len({answers["alpha"], answers["beta"], base}) == 3, answers
    assert multi(q, **gen) == answers["alpha"]  # no adapter named: the first one
    with pytest.raises(GlmtuneError, match="no adapter named 'gamma'"):
        multi(q, adapter="gamma", **gen)


def test_wrong_model_folder_is_a_clear_error(tmp_path):
    from glmtune import Predictor

    with pytest.raises(ModelNotFoundError, match="model not found"):
        Predictor(tmp_path / "nope")


def test_vllm_backend_missing_says_how_to_install(random_glm4_dir):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed; this checks the message when it is not")
    except ImportError:
        pass
    from glmtune import Predictor

    with pytest.raises(GlmtuneError, match=r"pip install 'glmtune\[vllm\]'"):
        Predictor(random_glm4_dir, backend="vllm")


def test_unknown_generation_option_is_rejected(trained_predictor):
    with pytest.raises(GlmtuneError, match="unknown generation option"):
        trained_predictor("hi", max_lenght=3)


def test_inference_liger_choice_on_cpu(random_glm4_dir):
    """liger kernels need CUDA: `auto` quietly uses none on CPU, `all` says why it cannot run; the
    name and values are the training config's speed.liger (flce, a fused loss, has no use here)."""
    pytest.importorskip("torch")
    from glmtune import Predictor

    assert Predictor(random_glm4_dir, liger="auto", device="cpu").backend.liger == "none"
    with pytest.raises(GlmtuneError, match="liger=all cannot run here: it needs a CUDA device"):
        Predictor(random_glm4_dir, liger="all", device="cpu")
    with pytest.raises(GlmtuneError, match="liger=flce fuses the training loss"):
        Predictor(random_glm4_dir, liger="flce", device="cpu")
    with pytest.raises(GlmtuneError, match="unknown liger 'fast'"):
        Predictor(random_glm4_dir, liger="fast", device="cpu")


def test_adapter_names_and_damaged_adapter_files(random_glm4_dir, two_adapters, tmp_path):
    import os
    import shutil

    from glmtune import Predictor
    from glmtune.errors import InputError

    with pytest.raises(InputError, match=r"field 'adapter': adapter name 'x\.y' is not a plain name"):
        Predictor(random_glm4_dir, adapter={"x.y": two_adapters["alpha"]})
    cut = shutil.copytree(two_adapters["alpha"], tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(InputError, match="damaged weight file") as e:
        Predictor(random_glm4_dir, adapter=cut)
    assert str(e.value).startswith(f"{weights}: ")


def test_a_query_list_must_be_content_parts(trained_predictor):
    """A list of messages (or of anything but parts) is refused naming `query`, not answered as empty parts."""
    from glmtune.errors import InputError

    with pytest.raises(InputError, match=r"query is a list of messages.*history=.*chat\(messages\)") as err:
        trained_predictor([{"role": "user", "content": QA[0][0]}])
    assert err.value.field == "query"
    with pytest.raises(InputError, match="unknown content part None") as err:
        trained_predictor([{"foo": 1}])
    assert err.value.field == "query[0].type"
    with pytest.raises(InputError, match="a text part needs a string 'text'"):
        list(trained_predictor.stream([{"type": "text", "text": 3}]))
    # text parts are one user turn, answered like the same string
    assert trained_predictor([{"type": "text", "text": QA[0][0]}]) == QA[0][1]
