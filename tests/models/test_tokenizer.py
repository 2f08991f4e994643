"""GLM tokenizers converted without remote code give the reference ids (tiktoken, sentencepiece).

ChatGLM2/3 logic runs on the synthetic tokenizer (tests/synthetic_chatglm.py, a small vocabulary, so
ids are read from it); `chatglm_tokenizer_dirs` repeats the sentencepiece parity on the real files,
and the published ids are checked on them (both marked shared_data: deselected where missing).
"""
from __future__ import annotations

import base64
import random

import pytest

from glmtune.errors import InputError, ModelNotFoundError
from glmtune.models.tokenizer import GLM4_PATTERN, GLM4_SPECIALS, load_tokenizer

TEXTS = ["Hello, world!", "你好，世界。我是一个人工智能助手。", "  leading and  double  spaces ",
         "line1\nline2\n\n\tTabbed", "数字 12345 and émojis 😀", "don't we'll I'M", ""]


@pytest.fixture(scope="module")
def glm4(glm4_tokenizer_dir):
    return load_tokenizer(glm4_tokenizer_dir)


@pytest.fixture(scope="module")
def chatglm3(chatglm3_tokenizer_dir):
    return load_tokenizer(chatglm3_tokenizer_dir)


@pytest.fixture(scope="module")
def chatglm2(chatglm2_tokenizer_dir):
    return load_tokenizer(chatglm2_tokenizer_dir)


@pytest.fixture(scope="module")
def tiktoken_ref(glm4_tokenizer_dir):
    import tiktoken

    ranks = {}
    for line in (glm4_tokenizer_dir / "tokenizer.model").read_bytes().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    specials = {s: len(ranks) + i for i, s in enumerate(GLM4_SPECIALS)}
    return tiktoken.Encoding("glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def sentencepiece_of(tokenizer_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def _plain(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _random_texts(n=400, seed=0):
    alphabet = list("abcXYZ  \n\t0189,.!?'你好世界中国。，！😀é-[]<>|") + ["sop", "[gMASK]", "</s>", "<|user|>",
                                                                   " the", "'s", "\n\n"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def test_glm4_special_ids(glm4):
    assert glm4.convert_tokens_to_ids(GLM4_SPECIALS) == list(range(151329, 151343))
    assert glm4.eos_token_id == glm4.pad_token_id == 151329
    assert len(glm4) == 151343


def test_glm4_matches_tiktoken(glm4, tiktoken_ref):
    for text in TEXTS + _random_texts():
        assert _plain(glm4, text) == tiktoken_ref.encode_ordinary(text), text


def test_glm4_round_trip_and_prefix(glm4):
    for text in TEXTS:
        assert glm4.decode(_plain(glm4, text)) == text
    assert glm4("你好")["input_ids"][:2] == [151331, 151333]  # like ChatGLM4Tokenizer: [gMASK]<sop>
    assert glm4("[gMASK]<sop><|user|>", add_special_tokens=False)["input_ids"] == [151331, 151333, 151336]


CHATGLM_IDS = ["<unk>", "<s>", "</s>", "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def chatglm_specials(tok, name):
    return tok.convert_tokens_to_ids(CHATGLM_IDS + (CHATGLM3_ROLES if name == "chatglm3" else []))


@pytest.mark.parametrize("name", ["chatglm3", "chatglm2"])
def test_chatglm_special_ids_follow_the_pieces(name, request):
    """Like tokenization_chatglm.SPTokenizer: unk/bos/eos are pieces 0-2, the specials come right
    after the sentencepiece vocabulary, in order."""
    tok = request.getfixturevalue(name)
    pieces = sentencepiece_of(request.getfixturevalue(f"{name}_tokenizer_dir")).vocab_size()
    extra = 9 if name == "chatglm3" else 5
    assert chatglm_specials(tok, name) == [0, 1, 2] + list(range(pieces, pieces + extra))
    assert tok.eos_token_id == 2 and tok.pad_token_id == tok.unk_token_id == 0
    assert len(tok) == pieces + extra


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["chatglm3", "chatglm2"])
def test_real_chatglm_special_ids(name, real_chatglm3_tokenizer_dir, real_chatglm2_tokenizer_dir):
    """The published ids: 64,789 pieces, [gMASK]=64790, sop=64792, <|user|>=64795."""
    tok = load_tokenizer(real_chatglm3_tokenizer_dir if name == "chatglm3" else real_chatglm2_tokenizer_dir)
    assert chatglm_specials(tok, name) == [0, 1, 2, 64789, 64790, 64791, 64792, 64793] + (
        [64794, 64795, 64796, 64797] if name == "chatglm3" else [])
    assert tok.eos_token_id == 2
    assert len(tok) == (64798 if name == "chatglm3" else 64794)


def test_chatglm_matches_sentencepiece(chatglm_tokenizer_dirs):
    chatglm3, chatglm2 = (load_tokenizer(chatglm_tokenizer_dirs[f]) for f in ("chatglm3", "chatglm2"))
    sp_ref = sentencepiece_of(chatglm_tokenizer_dirs["chatglm3"])
    for text in TEXTS + _random_texts():
        ref = sp_ref.encode(text)
        assert _plain(chatglm3, text) == ref, text
        assert _plain(chatglm2, text) == ref, text


def test_chatglm_round_trip_chinese(chatglm3):
    for text in ["你好，世界。", "ChatGLM3 是一个对话模型", "a\nb  c", "罕见字 龘 and 😀"]:  # 龘, 😀: byte fallback
        assert chatglm3.decode(_plain(chatglm3, text)) == text
    assert chatglm3("你好")["input_ids"][:2] == chatglm3.convert_tokens_to_ids(["[gMASK]", "sop"])


def test_special_strings_in_text_stay_text(chatglm3, glm4):
    assert chatglm3.convert_tokens_to_ids("[gMASK]") not in _plain(chatglm3, "a[gMASK]b sop")
    assert not set(_plain(glm4, "<|user|>[gMASK]<sop>")) & set(range(151329, 151343))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_wrong_family_for_sentencepiece(chatglm3_tokenizer_dir):
    with pytest.raises(InputError, match="sentencepiece"):
        load_tokenizer(chatglm3_tokenizer_dir, family="glm4")


def test_hf_folder_round_trip(glm4, tmp_path):
    """A converted tokenizer saved as tokenizer.json reloads through transformers unchanged."""
    glm4.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again("你好 world <|user|>", add_special_tokens=False)["input_ids"] == \
        glm4("你好 world <|user|>", add_special_tokens=False)["input_ids"]
