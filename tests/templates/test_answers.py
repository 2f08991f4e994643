"""What the model writes after a generation prompt, per template: `answer_ids` (the ids evaluation scores
a label by and alignment trains on) and `answer_text` (the answer read back from generated text)."""
from __future__ import annotations

import pytest

from glmtune.errors import InputError
from glmtune.templates import get_template

PROMPT = [{"role": "system", "content": "你是客服助手。"}, {"role": "user", "content": "你好"},
          {"role": "assistant", "content": "您好！"}, {"role": "user", "content": "查话费"}]
# The decoded answer ids of "余额 25 元": the metadata line (GLM-4 / ChatGLM3), content, end token, nothing after.
ANSWER_TEXT = {"glm4": "\n余额 25 元<|endoftext|>", "chatglm3": "\n 余额 25 元</s>", "chatglm2": "余额 25 元</s>",
               "qwen": "余额 25 元<|im_end|>", "llama3": "余额 25 元<|eot_id|>"}


@pytest.mark.parametrize("name", sorted(ANSWER_TEXT))
def test_answer_ids_are_what_follows_the_generation_prompt(name, tokenizer_for):
    tpl, tok = get_template(name), tokenizer_for(name)
    ids = tpl.answer_ids(tok, PROMPT, "余额 25 元")
    assert tok.decode(ids, skip_special_tokens=False) == ANSWER_TEXT[name]
    assert ids[-1] in tpl.stop_token_ids(tok) and not set(ids[:-1]) & set(tpl.stop_token_ids(tok))
    enc = tpl.encode(tok, [*PROMPT, {"role": "assistant", "content": "余额 25 元"}], train_on="last_assistant")
    prompt = tpl.encode_prompt(tok, PROMPT)
    assert enc.input_ids[:len(prompt) + len(ids)] == prompt + ids
    assert [t for t in enc.labels if t != -100] == ids  # exactly the trained tokens
    assert tpl.answer_ids(tok, PROMPT, "余额 25 元", prompt_ids=prompt) == ids


def test_qwen_answer_stops_at_its_end_token(chatml_tok):
    """ChatML renders a newline after <|im_end|>: part of the conversation, not of what the model writes."""
    tpl = get_template("qwen")
    full = tpl.encode(chatml_tok, [*PROMPT, {"role": "assistant", "content": "好"}]).input_ids
    ids = tpl.answer_ids(chatml_tok, PROMPT, "好")
    assert chatml_tok.decode(full[len(tpl.encode_prompt(chatml_tok, PROMPT)):]) == "好<|im_end|>\n"
    assert chatml_tok.decode(ids) == "好<|im_end|>"


def test_answer_ids_refuse_a_prompt_that_is_not_the_prefix(glm4_tok):
    tpl = get_template("glm4")
    with pytest.raises(InputError, match="renders the prompt differently"):
        tpl.answer_ids(glm4_tok, PROMPT, "好", prompt_ids=[1, 2, 3])


CASES = [  # (template, generated text, the answer)
    ("glm4", "\n你好！我是一个小模型。", "你好！我是一个小模型。"),
    ("glm4", "  \nHi", "Hi"),
    ("glm4", 'get_weather\n{"city": "北京"}', 'get_weather\n{"city": "北京"}'),  # a tool call: whole
    ("glm4", "你好，没有元数据行", "你好，没有元数据行"),  # no metadata line at all
    ("glm4", " Hello world\nsecond line", " Hello world\nsecond line"),
    ("chatglm3", "\n Hi there", "Hi there"),
    ("chatglm3", "interpreter\n```python\nprint(1)\n```", "interpreter\n```python\nprint(1)\n```"),
    ("qwen", "\nHi", "\nHi"),  # other families have no metadata line
    ("chatglm2", "\nHi", "\nHi"),
]


@pytest.mark.parametrize("template,text,answer", CASES)
def test_every_stream_state_grows_into_the_answer(template, text, answer):
    tpl = get_template(template)
    assert tpl.answer_text(text) == answer
    states = [tpl.answer_text(text[:n], final=False) for n in range(len(text) + 1)]
    assert states[-1] == answer
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states


def test_only_leading_whitespace_is_held_back():
    tpl = get_template("glm4")
    assert [tpl.answer_text(t, final=False) for t in ["", " ", "  ", "\n"]] == ["", "", "", ""]
    assert tpl.answer_text("你", final=False) == "你"
    assert tpl.answer_text(" get_we", final=False) == " get_we"
    assert tpl.answer_text("\n你", final=False) == "你"
