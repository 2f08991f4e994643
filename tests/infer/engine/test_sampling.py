"""Next-token choice on hand-set logits."""
from __future__ import annotations

import math

import torch

from glmtune.infer.engine.sampling import (SamplingRows, apply_repetition_penalty, is_stop, next_tokens,
                                           uniform_noise)


def rows(n, temperature=1.0, top_p=1.0, top_k=0, penalty=1.0, seed=0, step=0):
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype)  # noqa: E731
    return SamplingRows(full(temperature, torch.float32), full(top_p, torch.float32), full(top_k, torch.long),
                        full(penalty, torch.float32), full(seed, torch.long), full(step, torch.long))


def test_noise_is_uniform_and_a_function_of_seed_step_and_token():
    seed, step = torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0])
    u = uniform_noise(seed, step, 50_000)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert not torch.equal(uniform_noise(seed, step + 1, 10), u[:, :10])


def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, torch.tensor([2.0]), seen)
    assert out.tolist() == [[1.0, -4.0, 2.0]]


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    seeds = torch.arange(4000)
    r = rows(4000)
    r.seed = seeds
    drawn = next_tokens(logits, r, sampling=True)
    freq = torch.bincount(drawn, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    r.top_k = torch.full((4000,), 2)
    assert set(next_tokens(logits, r, sampling=True).tolist()) == {0, 1}
    r.top_k = torch.zeros(4000, dtype=torch.long)
    r.top_p = torch.full((4000,), 0.7)  # 0.5 + 0.3 reaches it: tokens 0 and 1 only
    freq = torch.bincount(next_tokens(logits, r, sampling=True), minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and math.isclose(freq[0].item(), 0.5 / 0.8, abs_tol=0.03)


def test_greedy_rows_take_the_argmax_beside_sampling_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    r = rows(2, temperature=0.0)
    assert next_tokens(logits, r, sampling=False).tolist() == [1, 1]
    r.temperature = torch.tensor([0.0, 50.0])
    picks = {tuple(next_tokens(logits, SamplingRows(r.temperature, r.top_p, r.top_k, r.penalty,
                                                     torch.tensor([s, s]), r.step), sampling=True).tolist())
             for s in range(40)}
    assert all(p[0] == 1 for p in picks) and len({p[1] for p in picks}) == 3


def test_stop_on_a_stop_id_or_at_max_new_tokens():
    tokens = torch.tensor([5, 7, 9])
    assert is_stop(tokens, torch.tensor([7]), torch.tensor([1, 1, 4]), torch.tensor([4, 4, 4])).tolist() == \
        [False, True, True]
