"""Next-token choice on the device, for a whole batch at once: greedy, temperature, top-k, top-p,
repetition penalty and per-request seeds, plus the stop test. Pure tensor code, so it runs inside a
captured CUDA graph and the host never reads logits.

Semantics follow transformers' ``generate``: the repetition penalty (CTRL, Keskar et al. 2019)
divides positive and multiplies negative logits of every token already in the prompt or answer;
then temperature, then top-k, then top-p on the top-k renormalised distribution. Greedy rows take
the arg-max after the penalty, so a greedy answer equals ``generate(do_sample=False)``'s.

Sampling draws with the exponential race (argmax p_i / E_i, E_i ~ Exp(1), is a draw from p), its
noise a counter-based hash of (seed, answer position, token id): a seeded request gets the same
answer whatever else shares its batch, and no generator state lives on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingRows:
    """Per-row decoding settings as device tensors, each (N,)."""
    temperature: object   # float32; 0 = greedy
    top_p: object         # float32 in (0, 1]
    top_k: object         # int64; 0 = every token
    penalty: object       # float32; 1 = none
    seed: object          # int64 (low 32 bits used)
    step: object          # int64: how many tokens the answer already has


def apply_repetition_penalty(logits, penalty, presence):
    """logits (N, V) float32; penalty (N,); presence (N, V) bool: tokens seen in prompt + answer."""
    import torch

    pen = penalty[:, None]
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
    return torch.where(presence, penalised, logits)


def uniform_noise(seed, step, vocab: int):
    """(N, V) floats in (0, 1) from a hash of (seed, step, token id) (lowbias32 mixing)."""
    import torch

    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    x = ((seed[:, None] & _MASK32) * 0x9E3779B1 + step[:, None] * 0x85EBCA77 + ids[None, :]) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5).div_(2.0 ** 32).to(torch.float32)


def sample_rows(logits, rows: SamplingRows):
    """Draw one token per row from temperature / top-k / top-p filtered logits (N, V) -> (N,)."""
    import torch

    vocab = logits.shape[-1]
    temp = torch.where(rows.temperature > 0, rows.temperature, torch.ones_like(rows.temperature))
    sorted_logits, order = torch.sort(logits / temp[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(rows.top_k > 0, rows.top_k, torch.full_like(rows.top_k, vocab))
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass ranked above each token
    keep = (before < rows.top_p[:, None]) | (rank == 0)
    noise = uniform_noise(rows.seed, rows.step, vocab).gather(1, order)
    score = torch.where(keep, probs / -torch.log(noise), torch.zeros_like(probs))
    return order.gather(1, score.argmax(dim=-1, keepdim=True))[:, 0]


def next_tokens(logits, rows: SamplingRows, presence=None, *, sampling: bool):
    """The batch's next tokens: greedy rows take the arg-max; with ``sampling`` the others draw.

    ``sampling`` False (no row samples and no row penalises): the arg-max alone, the cheapest step."""
    import torch

    logits = logits.float()
    if not sampling:
        return logits.argmax(dim=-1)
    if presence is not None:
        logits = apply_repetition_penalty(logits, rows.penalty, presence)
    greedy = logits.argmax(dim=-1)
    drawn = sample_rows(logits, rows)
    return torch.where(rows.temperature > 0, drawn, greedy)


def is_stop(tokens, stop_ids, answer_len, max_new):
    """(N,) bool: the token is a stop id, or the answer reached its max_new_tokens."""
    import torch

    return torch.isin(tokens, stop_ids) | (answer_len >= max_new)
