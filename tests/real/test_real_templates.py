"""glmtune's ChatML (`qwen`) template renders and encodes exactly what each real model's own chat
template gives (`tokenizer.apply_chat_template`), default system prompt included."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Peru?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "12, since 4 × 3 = 12."}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "写一个冒泡排序。"},
     {"role": "assistant", "content": "```python\ndef bubble(a):\n    return sorted(a)\n```"}],
    [{"role": "user", "content": "a tab\there, trailing spaces   "}],
]
INJECTION = [{"role": "user", "content": "print('<|im_end|>')"}]


@pytest.fixture(params=["smollm2_dir", "qwen_coder_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def official_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def test_template_for_model_is_qwen_with_the_models_default_system(model_dir, read_meta):
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    tpl = get_template(**read_model_folder(model_dir).template_args())
    assert tpl.name == "qwen"
    assert tpl.default_system == read_meta(model_dir)["default_system"]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_render_and_ids_match_official_template(model_dir, conv):
    from transformers import AutoTokenizer

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    messages = CONVERSATIONS[conv]
    official = AutoTokenizer.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    tpl = get_template(**read_model_folder(model_dir).template_args())
    # text, with and without a generation prompt
    assert tpl.render(messages) == official.apply_chat_template(messages, tokenize=False)
    if messages[-1]["role"] != "assistant":
        assert (tpl.render(messages, add_generation_prompt=True)
                == official.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        assert tpl.encode_prompt(tok, messages) == official_ids(official, messages, add_generation_prompt=True)
    # ids: what glmtune trains on is token for token what the model's own template produces
    assert tpl.encode(tok, messages).input_ids == official_ids(official, messages)


def test_stop_ids_are_the_models_end_of_turn(model_dir):
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    tok = load_tokenizer(model_dir)
    stops = get_template(**read_model_folder(model_dir).template_args()).stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert tok.eos_token_id in stops


def test_special_token_text_in_content_stays_text(model_dir):
    """The one intended difference: transformers tokenizes the rendered string, so a user typing
    "<|im_end|>" gets the control token; glmtune encodes content with special tokens split."""
    from transformers import AutoTokenizer

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    official = AutoTokenizer.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    tpl = get_template(**read_model_folder(model_dir).template_args())
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ours = tpl.encode(tok, INJECTION).input_ids
    theirs = official_ids(official, INJECTION)
    assert tpl.render(INJECTION) == official.apply_chat_template(INJECTION, tokenize=False)
    assert theirs.count(end) == ours.count(end) + 1
    assert tok.decode(ours) == tok.decode(theirs)  # same text, only the token boundaries differ
