"""Rewards on hand-checked values; every one is a TRL reward function fn(prompts, completions, **columns)."""
from __future__ import annotations

import pytest

from glmtune.align.config import RewardSpec
from glmtune.align.rewards import RewardContext, build_rewards, jaccard, similarity_scores
from glmtune.errors import ConfigError

RECORDS = [{"messages": [{"role": "user", "content": "x red"}, {"role": "assistant", "content": "apple"}], "label": "red"},
           {"messages": [{"role": "user", "content": "x blue"}, {"role": "assistant", "content": "river"}],
            "label": "blue"}]


def _build(*specs):
    fns, weights = build_rewards([RewardSpec(**s) for s in specs], RewardContext(RECORDS))
    return fns, weights


def test_label_reward_uses_the_evaluation_parser():
    (fn,), _ = _build({"name": "label"})
    assert fn.__name__ == "label"
    assert fn(["p"] * 4, ["apple", " river\n", "blue", "banana"], label=["red", "blue", "blue", "red"]) == \
        [1.0, 1.0, 1.0, 0.0]  # answer text -> label, a bare label name, anything else wrong


def test_format_length_and_custom_rewards():
    (fmt, length, custom), weights = _build({"name": "format", "options": {"pattern": r"\d+"}},
                                            {"name": "length", "weight": 0.5, "options": {"max_chars": 4}},
                                            {"name": "toy_task:count_words"})
    assert fmt(["p", "p"], ["42", "4 2"]) == [1.0, 0.0]
    assert length(["p", "p"], ["abcd", "abcdef"]) == [0.0, -0.5]
    assert custom(["p"], ["a b c"]) == [3.0]
    assert weights == [1.0, 0.5, 1.0]


def test_similarity_cosine_plus_jaccard_minus_bad():
    assert jaccard("a b c", "a b d") == pytest.approx(2 / 4)
    assert jaccard("ab", "abc", "char") == pytest.approx(2 / 3)
    encode = lambda texts: __import__("torch").eye(3)[[{"x": 0, "y": 1, "z": 2}[t[0]] for t in texts]]  # noqa: E731
    got = similarity_scores(["x1", "y1"], [["x1", "y2"], []], encode, cosine_weight=0.5, jaccard_weight=0.5)
    assert got == pytest.approx([1.0, 0.0])
    (fn,), _ = _build({"name": "similarity"})  # real MiniLM embeddings
    good, bad = fn(["p", "p"], ["the river is long", "I like apples"], references=[["the river is long"]] * 2,
                   bad_answers=[["I like apples"]] * 2)
    assert good > 0.8 and bad < 0  # good: 1 minus its (small) similarity to the bad answer


def test_judge_reward_scores_on_the_rubric_scale(monkeypatch):
    from glmtune.evaluate import judge
    seen = []
    monkeypatch.setattr(judge.OpenAIChatJudge, "__call__", lambda self, msgs: seen.append(msgs) or '{"score": 10}')
    ctx = RewardContext(RECORDS, prompt_messages={"P": [{"role": "user", "content": "Name a fruit"}]})
    (fn,), _ = build_rewards([RewardSpec(name="judge", options={"url": "http://127.0.0.1:9/v1"})], ctx)
    assert fn(["P"], ["apple"], references=[["apple"]]) == [1.0]
    assert "Name a fruit" in seen[0][0]["content"] and "REFERENCE" in seen[0][0]["content"]


def test_unknown_reward_and_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="align.rewards.0.name"):
        _build({"name": "nope"})
    with pytest.raises(ConfigError, match="align.rewards.0.options"):
        _build({"name": "length", "options": {"maxchars": 3}})
    with pytest.raises(ConfigError, match="align.rewards.0.name.*cannot import"):
        _build({"name": "no_module_here:fn"})
