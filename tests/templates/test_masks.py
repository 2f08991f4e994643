"""Loss masks for every family: exactly the assistant outputs and their end tokens are trained."""
from __future__ import annotations

import pytest

from glmtune.errors import InputError
from glmtune.templates import IGNORE_INDEX, get_template, list_templates

CONV = [{"role": "system", "content": "你是客服助手。"},
        {"role": "user", "content": "你好，我想查话费。"},
        {"role": "assistant", "content": "好的，请提供您的手机号。"},
        {"role": "user", "content": "13800000000"},
        {"role": "assistant", "content": "您的余额是 25 元。"},
        {"role": "user", "content": "谢谢 [gMASK] <|user|>"},
        {"role": "assistant", "content": "不客气！"}]
ASSISTANT_TURNS = [2, 4, 6]
# What the model writes after the generation prompt, per family: (text before content, end tokens).
OUTPUT_FORM = {"glm4": ("\n", ["<|user|>", "<|user|>", "<|endoftext|>"]),
               "chatglm3": ("\n ", ["<|user|>", "<|user|>", "</s>"]),
               "chatglm2": ("", ["</s>", "</s>", "</s>"]),
               "qwen": ("", ["<|im_end|>"] * 3),
               "llama3": ("", ["<|eot_id|>"] * 3)}
PREFIX = {"glm4": ["[gMASK]", "<sop>"], "chatglm3": ["[gMASK]", "sop"], "chatglm2": ["[gMASK]", "sop"]}


def test_registry_lists_all_families():
    assert list_templates() == ["chatglm2", "chatglm3", "glm4", "glm45", "glm47", "glmz1", "llama3", "qwen"]
    with pytest.raises(InputError, match="unknown template"):
        get_template("nope")


@pytest.fixture(params=sorted(OUTPUT_FORM))
def family(request, tokenizer_for):
    return request.param, get_template(request.param), tokenizer_for(request.param)


def _trained_texts(tok, enc):
    return [tok.decode([enc.input_ids[i] for i in range(a, b)]) for a, b in enc.trained_spans()]


def test_all_assistant_turns_and_end_tokens_trained(family):
    name, tpl, tok = family
    enc = tpl.encode(tok, CONV)
    lead, ends = OUTPUT_FORM[name]
    expected = [lead + CONV[t]["content"] + end for t, end in zip(ASSISTANT_TURNS, ends)]
    assert _trained_texts(tok, enc) == expected
    assert [tok.decode(enc.input_ids[a:b]) for a, b in enc.turn_spans] == expected
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))


def test_last_assistant_and_everything(family):
    name, tpl, tok = family
    full = tpl.encode(tok, CONV)
    last = tpl.encode(tok, CONV, train_on="last_assistant")
    every = tpl.encode(tok, CONV, train_on="everything")
    assert last.input_ids == every.input_ids == full.input_ids
    assert last.trained_spans() == [full.turn_spans[-1]]
    assert every.labels == every.input_ids
    with pytest.raises(InputError, match="train_on"):
        tpl.encode(tok, CONV, train_on="prompts")


def test_prefix_exactly_once(family):
    name, tpl, tok = family
    ids = tpl.encode(tok, CONV).input_ids
    for token in PREFIX.get(name, ["<|begin_of_text|>"] if name == "llama3" else []):
        assert ids.count(tok.convert_tokens_to_ids(token)) == 1
    assert ids[:len(PREFIX.get(name, []))] == tok.convert_tokens_to_ids(PREFIX.get(name, []))


def test_generation_prompt_is_prefix_of_training_ids(family):
    """Serving prompts equal training prompts: each turn's prompt is the ids before its output."""
    name, tpl, tok = family
    enc = tpl.encode(tok, CONV)
    for turn, (start, _) in zip(ASSISTANT_TURNS, enc.turn_spans):
        prompt = tpl.encode_prompt(tok, CONV[:turn])
        assert prompt == enc.input_ids[:start]
        # Re-tokenizing the rendered text agrees too, except where it cannot: later prompts hold the
        # user's "[gMASK]" text, and ChatGLM2 answers are encoded apart from their prompt (as in
        # ChatGLM2's own fine-tuning) with no special token between them in the text.
        if turn < 5 and not (name == "chatglm2" and turn > 2):
            text = tpl.render(CONV[:turn], add_generation_prompt=True)
            assert tok(text, add_special_tokens=False)["input_ids"] == prompt
    with pytest.raises(InputError, match="ends with an assistant"):
        tpl.encode_prompt(tok, CONV)


def test_special_strings_in_content_are_plain_text(family):
    name, tpl, tok = family
    ids = tpl.encode(tok, CONV).input_ids
    user_ids = tok.convert_tokens_to_ids(["[gMASK]", "<|user|>"])
    expected = {"glm4": (1, 3), "chatglm3": (1, 3), "chatglm2": (1, 0)}.get(name, (0, 0))
    counts = tuple(ids.count(i) for i in user_ids if i is not None and i != tok.unk_token_id)
    assert counts == expected[:len(counts)]


def test_stop_ids(glm4_tok, chatml_tok):
    assert get_template("glm4").stop_token_ids(glm4_tok) == [151329, 151336, 151338]
    tok = chatml_tok
    assert get_template("qwen").stop_token_ids(tok) == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_chatglm_stop_ids(chatglm3_tok, chatglm2_tok):
    # </s> (2) and the roles that end an answer: <|user|>, <|observation|> (64795, 64797 in the real model)
    assert get_template("chatglm3").stop_token_ids(chatglm3_tok) == \
        [2] + chatglm3_tok.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
    assert get_template("chatglm2").stop_token_ids(chatglm2_tok) == [2]


def test_glm4_tool_call_turns(glm4_tok):
    tools = [{"type": "function", "function": {"name": "get_balance", "parameters": {}}}]
    conv = [{"role": "user", "content": "查余额"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_balance", "arguments": {"phone": "138"}}}]},
            {"role": "tool", "content": '{"balance": 25}'},
            {"role": "assistant", "content": "余额 25 元。"}]
    tpl = get_template("glm4")
    enc = tpl.encode(glm4_tok, conv, tools=tools)
    assert _trained_texts(glm4_tok, enc) == ['get_balance\n{"phone": "138"}<|observation|>',
                                             "\n余额 25 元。<|endoftext|>"]
    assert tpl.encode_prompt(glm4_tok, conv[:3], tools=tools) == enc.input_ids[:enc.turn_spans[1][0]]


def test_chatglm3_tool_call_turns(chatglm3_tok):
    tools = [{"type": "function", "function": {"name": "get_balance", "parameters": {}}}]
    conv = [{"role": "user", "content": "查余额"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_balance", "arguments": '{"phone": "138"}'}}]},
            {"role": "observation", "content": "25"}, {"role": "assistant", "content": "余额 25 元。"}]
    text = get_template("chatglm3").render(conv, tools=tools)
    assert text.startswith("[gMASK]sop<|system|>\n Answer the following questions")
    assert "<|assistant|>get_balance\n ```python\ntool_call(phone='138')\n```<|observation|>" in text


@pytest.mark.parametrize("name", ["chatglm2", "qwen", "llama3"])
def test_unsupported_tools_are_clear_errors(name):
    with pytest.raises(InputError, match="tools"):
        get_template(name).render(CONV, tools=[{"type": "function", "function": {"name": "f"}}])


def test_bad_roles_name_the_field():
    tpl = get_template("glm4")
    with pytest.raises(InputError, match=r"messages\[1\].role"):
        tpl.render([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(InputError, match=r"messages\[1\].role"):
        tpl.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
