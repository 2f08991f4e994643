"""Golden tests: rendered text equals the official chat templates, ids equal reference tokenizers.

The ChatGLM2/3 references (sentencepiece + tokenization_chatglm's id rule) run on the synthetic
tokenizer and, where ../shared/data has them, on the real files (`chatglm_tokenizer_dirs`)."""
from __future__ import annotations

import base64
import json

import pytest

from glmtune.models.tokenizer import CHATGLM3_CHAT_TEMPLATE, GLM4_PATTERN, GLM4_SPECIALS
from glmtune.models.folder import read_model_folder, render_jinja
from glmtune.templates import get_template

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "北京的天气怎么样？"},
     {"role": "assistant", "content": "北京今天晴，气温 25 度。"},
     {"role": "user", "content": "明天呢？"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4, of course."},
     {"role": "user", "content": "Multi\nline\n\n  text with 'quotes' and 表情 😀"},
     {"role": "assistant", "content": "好的。\n- a\n- b"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def glm4_official(glm4_tokenizer_dir):
    return json.loads((glm4_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture(scope="module")
def tiktoken_ref(glm4_tokenizer_dir):
    import tiktoken

    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in (glm4_tokenizer_dir / "tokenizer.model").read_bytes().splitlines())}
    return tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(GLM4_SPECIALS)})


@pytest.fixture(scope="module")
def chatglm(chatglm_tokenizer_dirs):
    """(chatglm3 tokenizer, chatglm2 tokenizer, sentencepiece reference) of one model file."""
    import sentencepiece

    from glmtune.models.tokenizer import load_tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(chatglm_tokenizer_dirs["chatglm3"] / "tokenizer.model"))
    return load_tokenizer(chatglm_tokenizer_dirs["chatglm3"]), load_tokenizer(chatglm_tokenizer_dirs["chatglm2"]), sp


def chatglm_special_ids(sp) -> dict[str, int]:
    """tokenization_chatglm.SPTokenizer's rule, not glmtune's loader: the special tokens follow the
    sentencepiece vocabulary in this order (64790 = [gMASK] for the real 64,789-piece model)."""
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
             "<|observation|>"]
    return {name: sp.vocab_size() + i for i, name in enumerate(names)}


def _cases():
    for i, conv in enumerate(CONVERSATIONS):
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                continue
            yield pytest.param(conv, gen, id=f"conv{i}-gen{int(gen)}")


def _ids(tpl, tok, conv, gen):
    return tpl.encode_prompt(tok, conv) if gen else tpl.encode(tok, conv, add_eos=False).input_ids


@pytest.mark.parametrize("conv,gen", list(_cases()))
def test_glm4_matches_official_template_and_tiktoken(conv, gen, glm4_official, glm4_tok, tiktoken_ref):
    tpl = get_template("glm4")
    text = tpl.render(conv, add_generation_prompt=gen)
    assert text == render_jinja(glm4_official, conv, add_generation_prompt=gen)
    ids = _ids(tpl, glm4_tok, conv, gen)
    assert ids == tiktoken_ref.encode(text, allowed_special="all")
    assert ids == glm4_tok(text, add_special_tokens=False)["input_ids"]
    if not gen:
        assert glm4_tok.apply_chat_template(conv, tokenize=False) == text


def test_glm4_tools_match_official_template(glm4_official, glm4_tok, tiktoken_ref):
    conv = [{"role": "system", "content": "你是天气助手"}, {"role": "user", "content": "上海天气？"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}}]},
            {"role": "observation", "content": '{"temp": 30}'},
            {"role": "assistant", "content": "上海现在 30 度。"}]
    # The official template reads tools from a message and tool calls as metadata blocks.
    official_msgs = [{"role": "system", "content": "你是天气助手", "tools": TOOLS}, conv[1],
                     {"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'},
                     conv[3], conv[4]]
    tpl = get_template("glm4")
    text = tpl.render(conv, tools=TOOLS)
    assert text == render_jinja(glm4_official, official_msgs)
    assert tpl.encode(glm4_tok, conv, tools=TOOLS, add_eos=False).input_ids == \
        tiktoken_ref.encode(text, allowed_special="all")


def _chatglm3_reference(sp, conv, gen):
    """ChatGLM3's build_chat_input: role token, sp.encode(metadata + "\\n"), sp.encode(content)."""
    special = chatglm_special_ids(sp)
    ids = [special["[gMASK]"], special["sop"]]
    for msg in conv:
        ids += [special[f"<|{msg['role']}|>"]] + sp.encode("\n") + sp.encode(msg["content"])
    return ids + ([special["<|assistant|>"]] if gen else [])


@pytest.mark.parametrize("conv,gen", list(_cases()))
def test_chatglm3_matches_official_template_and_sentencepiece(conv, gen, chatglm):
    chatglm3_tok, _, sp_ref = chatglm
    tpl = get_template("chatglm3")
    text = tpl.render(conv, add_generation_prompt=gen)
    assert text == render_jinja(CHATGLM3_CHAT_TEMPLATE, conv, add_generation_prompt=gen)
    ids = _ids(tpl, chatglm3_tok, conv, gen)
    assert ids == _chatglm3_reference(sp_ref, conv, gen)
    assert ids == chatglm3_tok(text, add_special_tokens=False)["input_ids"]


def test_chatglm2_matches_build_prompt(chatglm):
    """ChatGLM2 chat(): prefix + sp.encode(build_prompt(query)); fine-tuning adds answer + </s>."""
    _, chatglm2_tok, sp_ref = chatglm
    special = chatglm_special_ids(sp_ref)
    prefix = [special["[gMASK]"], special["sop"]]
    conv = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！有什么可以帮你？"}]
    tpl = get_template("chatglm2")
    prompt = "[Round 1]\n\n问：你好\n\n答："
    assert tpl.render(conv[:1], add_generation_prompt=True) == "[gMASK]sop" + prompt
    assert tpl.encode_prompt(chatglm2_tok, conv[:1]) == prefix + sp_ref.encode(prompt)
    assert tpl.encode(chatglm2_tok, conv).input_ids == \
        prefix + sp_ref.encode(prompt) + sp_ref.encode(conv[1]["content"]) + [sp_ref.eos_id()]


QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PLAIN_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("chat_template,default", [(QWEN25_TEMPLATE, "You are Qwen"), (PLAIN_CHATML_TEMPLATE, None)])
def test_chatml_matches_tokenizer_chat_template(chat_template, default, chatml_tok, tmp_path):
    """read_model_folder reads the model's default system prompt, so apply_chat_template agrees."""
    chatml_tok.chat_template = chat_template
    chatml_tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    tpl = get_template(**read_model_folder(tmp_path).template_args())
    assert tpl.name == "qwen"
    assert (tpl.default_system or "").startswith(default or "")
    for conv in CONVERSATIONS:
        for gen in (False, True):
            if gen and conv[-1]["role"] == "assistant":
                continue
            text = tpl.render(conv, add_generation_prompt=gen)
            assert text == chatml_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert _ids(tpl, chatml_tok, conv, gen) == chatml_tok(text, add_special_tokens=False)["input_ids"]


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("conv,gen", list(_cases()))
def test_llama3_matches_meta_template(conv, gen, llama3_tok):
    tpl = get_template("llama3")
    text = tpl.render(conv, add_generation_prompt=gen)
    assert text == render_jinja(LLAMA3_TEMPLATE, conv, add_generation_prompt=gen, bos_token="<|begin_of_text|>")
    assert _ids(tpl, llama3_tok, conv, gen) == llama3_tok(text, add_special_tokens=False)["input_ids"]
