"""The one overflow policy (glmtune.data.cutoff) on the shipped GLM-4 tokenizer: what is cut, what is kept,
what is dropped, and that `data stats`, training and evaluation agree on it."""
from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.data.cutoff import IGNORE_INDEX, fit_records, segment_pieces
from glmtune.errors import ConfigError, InputError

SHIPPED_GLM4 = Path(__file__).resolve().parents[2] / "glmtune" / "resources" / "tokenizers" / "glm4"
HEAD, MIDDLE, TAIL = "开头第一句。", "中间的话。" * 40, "结尾最后一句"


@pytest.fixture(scope="module")
def glm4():
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    return get_template("glm4"), load_tokenizer(SHIPPED_GLM4)


def conv(*turns, system=None, source="d.jsonl", line=1):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": msgs, "meta": {"source": source, "line": line}}


def trained_text(tok, fitted) -> str:
    return tok.decode([t for t in fitted.labels if t != IGNORE_INDEX])


def test_long_review_keeps_its_answer_and_cuts_the_chosen_side(glm4):
    tpl, tok = glm4
    rec = conv(HEAD + MIDDLE + TAIL, "差评", system="判断评价是好评还是差评")
    full = tpl.encode(tok, rec["messages"])
    answer = [t for t in full.labels if t != IGNORE_INDEX]
    for side, kept, lost in (("left", TAIL, HEAD), ("right", HEAD, TAIL)):
        (fitted,), report = fit_records([rec], tpl, tok, 64, side=side)
        text = tok.decode(fitted.input_ids)
        assert len(fitted) == 64 and report.truncated == 1 and report.kept == 1
        assert [t for t in fitted.labels if t != IGNORE_INDEX] == answer      # the answer, whole and trained
        assert fitted.labels[-len(answer):] == answer                          # ... at the very end
        assert text.startswith("[gMASK]<sop><|system|>\n判断评价是好评还是差评<|user|>\n")
        assert kept in text and lost not in text and text.endswith("<|assistant|>\n差评<|endoftext|>")


def test_earlier_answer_that_loses_tokens_is_context_only(glm4):
    tpl, tok = glm4
    rec = conv("第一个问题" + MIDDLE, "第一个回答" + MIDDLE, "第二个问题", "第二个回答")
    full = len(tpl.encode(tok, rec["messages"]))
    # cut more than the first user text: the first answer loses tokens and is no longer trained
    n_user = len(segment_pieces(tpl, tok, rec["messages"])[3].ids)
    (fitted,), report = fit_records([rec], tpl, tok, full - n_user - 5, side="left")
    assert trained_text(tok, fitted) == "\n第二个回答<|endoftext|>"
    assert "第一个回答" not in tok.decode(fitted.input_ids) and "第二个问题" in tok.decode(fitted.input_ids)
    # cut only inside the first question: both answers stay trained
    (fitted,), _ = fit_records([rec], tpl, tok, full - 5, side="left")
    assert trained_text(tok, fitted).count("回答") == 2


def test_answer_alone_over_cutoff_is_dropped_and_counted(glm4):
    tpl, tok = glm4
    ok, too_long = conv(MIDDLE, "好评"), conv("短问题", "很长的回答。" * 60)
    kept, report = fit_records([ok, too_long], tpl, tok, 40)
    assert len(kept) == 1 and report.counts() == {"encoded": 1, "truncated": 1, "dropped": 1,
                                                   "answer_too_long": 1, "no_loss": 0}
    assert report.overflowed == 2 and "d.jsonl:1" in report.examples[0]
    kept, report = fit_records([ok, too_long], tpl, tok, 40, on_overflow="drop")
    assert kept == [] and report.dropped == 2 and report.counts()["dropped"] == 2


def test_error_names_the_record_and_system_prompt_over_cutoff_is_a_config_error(glm4):
    tpl, tok = glm4
    with pytest.raises(InputError) as e:
        fit_records([conv("短", "好"), conv(MIDDLE, "好评", line=7)], tpl, tok, 40, on_overflow="error")
    assert "d.jsonl:7:" in str(e.value) and "tokens, more than the cutoff 40" in str(e.value)
    with pytest.raises(ConfigError, match=r"field 'data.cutoff_len'.*system prompt"):
        fit_records([conv("hi", "hello", system="You classify intents. " * 20)], tpl, tok, 32)


def test_training_prompt_equals_evaluation_prompt_under_the_same_budget(glm4):
    """Evaluation truncates the generation prompt to max_len; training cuts the same dialogue tokens."""
    from glmtune.evaluate.classify import truncate_prompt
    tpl, tok = glm4
    rec = conv(HEAD + MIDDLE + TAIL, "差评", system="判断评价是好评还是差评")
    prompt_msgs = rec["messages"][:-1]
    prompt = tpl.encode_prompt(tok, prompt_msgs)
    for side in ("left", "right"):
        (fitted,), _ = fit_records([rec], tpl, tok, 80, side=side)
        n_answer = len(fitted) - fitted.labels.index(next(t for t in fitted.labels if t != IGNORE_INDEX))
        cut, was_cut = truncate_prompt(tpl, tok, prompt_msgs, prompt, 80 - n_answer, side)
        assert was_cut and fitted.input_ids[:len(cut)] == cut and len(cut) + n_answer == 80


def test_stats_report_exactly_what_training_does(glm4):
    from glmtune.data.stats import compute_stats
    from glmtune.train.data import encode_records
    tpl, tok = glm4
    records = [conv(MIDDLE, "好评"), conv("短", "好"), conv("短问题", "很长的回答。" * 60),
               conv("q" + MIDDLE, "a" + MIDDLE, "q2", "a2")]
    for side in ("left", "right"):
        for on_overflow in ("truncate", "drop"):
            stats = compute_stats(records, template=tpl, tokenizer=tok, cutoff=60, on_overflow=on_overflow,
                                  truncate_side=side, train_on="all_assistant")
            examples, counts = encode_records(records, tok, tpl, cutoff_len=60, on_overflow=on_overflow,
                                              truncate_side=side, train_on="all_assistant")
            assert stats.after_cutoff == counts and counts["encoded"] == len(examples)
            assert stats.trained_tokens_after_cutoff == sum(lab != IGNORE_INDEX for e in examples
                                                            for lab in e.labels[1:])
    assert counts == {"encoded": 1, "truncated": 0, "dropped": 3, "answer_too_long": 0, "no_loss": 0}
    assert stats.over_cutoff == 3 and stats.after_cutoff["dropped"] == 3
