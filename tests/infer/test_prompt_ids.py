"""One source of truth: Predictor prompts are the training template's prompt ids, for every family."""
from __future__ import annotations

import pytest

from glmtune.models.folder import write_glmtune_meta
from glmtune.models.tiny import build_tiny_glm4
from glmtune.models.tokenizer import load_tokenizer
from glmtune.templates import get_template

def chatglm_overrides(tok_dir) -> dict:
    """A tiny model shape for a ChatGLM tokenizer: an embedding row per id (rounded up to 64, as
    ChatGLM pads 64,798 ids to 65,024 rows), pad = unk = 0, eos = </s> = 2."""
    rows = -(-len(load_tokenizer(tok_dir)) // 64) * 64
    return {"vocab_size": rows, "pad_token_id": 0, "eos_token_id": 2}


@pytest.fixture(scope="module", params=["glm4", "chatglm3", "chatglm2"])
def family_predictor(request, tmp_path_factory):
    from glmtune import Predictor

    family = request.param
    tok_dir = request.getfixturevalue(f"{family}_tokenizer_dir")
    out = tmp_path_factory.mktemp(family) / "model"
    build_tiny_glm4(out, tok_dir, overrides=None if family == "glm4" else chatglm_overrides(tok_dir))
    if family != "glm4":
        # The tiny builder saves a fast tokenizer; keep the family explicit for detection.
        write_glmtune_meta(out, template=family)
    return family, Predictor(out, max_new_tokens=4)


CONVERSATION = [{"role": "system", "content": "You answer briefly. 简洁回答。"},
                {"role": "user", "content": "What is [gMASK] <|user|> 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "再加三呢？"}]


def test_prompt_ids_equal_training_template(family_predictor):
    family, predictor = family_predictor
    assert predictor.template.name == family
    tpl, tok = get_template(family), load_tokenizer(predictor.model_dir)
    ids = predictor.prompt_ids(CONVERSATION)
    assert ids == tpl.encode_prompt(tok, CONVERSATION)
    # The prompt is exactly the training ids up to where the trained answer starts.
    train = tpl.encode(tok, CONVERSATION + [{"role": "assistant", "content": "7"}])
    assert train.input_ids[:len(ids)] == ids
    assert train.turn_spans[-1][0] == len(ids), "the last answer is trained from the prompt's end on"
    # The same conversation through the (query, history, system) form.
    msgs = predictor.messages_for("再加三呢？", history=[("What is [gMASK] <|user|> 2+2?", "4")],
                                  system="You answer briefly. 简洁回答。")
    assert predictor.prompt_ids(msgs) == ids
    gmask = tok.convert_tokens_to_ids("[gMASK]")
    assert ids.count(gmask) == 1, "the [gMASK] prefix must appear once (user text stays text)"


def test_stop_ids_come_from_template(family_predictor):
    family, predictor = family_predictor
    expected = {"glm4": [151329, 151336, 151338]}.get(family)
    tok = load_tokenizer(predictor.model_dir)
    assert predictor.stop_ids == get_template(family).stop_token_ids(tok)
    if expected:
        assert predictor.stop_ids == expected


def test_batch_prompts_are_left_padded_without_doubled_prefix(family_predictor):
    family, predictor = family_predictor
    prompts = [predictor.prompt_ids(predictor.messages_for(q)) for q in ("hi", "a much longer question here")]
    ids, mask = predictor.backend._left_pad(prompts)
    gmask = predictor.tokenizer.convert_tokens_to_ids("[gMASK]")
    for row, m, p in zip(ids.tolist(), mask.tolist(), prompts):
        assert row[len(row) - len(p):] == p and sum(m) == len(p) and m[-1] == 1
        assert row.count(gmask) == 1
