"""Tokenizers for template tests: GLM-4's, the synthetic ChatGLM2/3 one (tests/synthetic_chatglm.py),
plus ChatML and Llama-3 tokenizers built offline from the GLM-4 vocabulary with their control tokens added."""
from __future__ import annotations

import pytest

from glmtune.models.tokenizer import load_tokenizer

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def glm4_tok(glm4_tokenizer_dir):
    return load_tokenizer(glm4_tokenizer_dir)


@pytest.fixture(scope="session")
def chatglm3_tok(chatglm3_tokenizer_dir):
    return load_tokenizer(chatglm3_tokenizer_dir)


@pytest.fixture(scope="session")
def chatglm2_tok(chatglm2_tokenizer_dir):
    return load_tokenizer(chatglm2_tokenizer_dir)


def _with_specials(tokenizer_dir, specials):
    tok = load_tokenizer(tokenizer_dir)  # a fresh object: adding tokens must not leak into glm4_tok
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


@pytest.fixture(scope="session")
def chatml_tok(glm4_tokenizer_dir):
    return _with_specials(glm4_tokenizer_dir, CHATML_SPECIALS)


@pytest.fixture(scope="session")
def llama3_tok(glm4_tokenizer_dir):
    return _with_specials(glm4_tokenizer_dir, LLAMA3_SPECIALS)


TOKENIZER_FIXTURES = {"glm4": "glm4_tok", "glmz1": "glm4_tok", "chatglm3": "chatglm3_tok", "chatglm2": "chatglm2_tok",
                      "qwen": "chatml_tok", "llama3": "llama3_tok", "glm45": "glm45_tok", "glm47": "glm45_tok"}


@pytest.fixture
def tokenizer_for(request):
    """family -> its tokenizer, loaded on first use: a GLM-4 case never needs the ChatGLM files."""
    return lambda family: request.getfixturevalue(TOKENIZER_FIXTURES[family])


@pytest.fixture(scope="session")
def glm45_tok(glm4_tokenizer_dir):
    """The GLM-4.5+ tokenizer: GLM-4's vocabulary plus its added tokens at the official ids (151343..)."""
    from glmtune.models.tokenizer import GLM45_SPECIALS, glm45_tokenizer

    tok = glm45_tokenizer(glm4_tokenizer_dir)  # a fresh object: glm4_tok stays the GLM-4 tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in GLM45_SPECIALS] == list(range(151343, 151365))
    return tok
