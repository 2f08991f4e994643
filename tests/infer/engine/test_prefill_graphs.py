"""Prefill forwards padded to token buckets (what CUDA graphs capture): the layout's values, which
bucket a forward takes, and answers equal to transformers' generate when the padded forward runs
(eagerly on the CPU) for fresh, joining, chunked and prefix-reusing prompts."""
from __future__ import annotations

import pytest
from engine_refs import joining_answers, reference

from glmtune.infer.engine.attention import PrefillChunk
from glmtune.infer.engine.prefill_graphs import FIELDS, PrefillGraphs, field_sizes, padded_layout


def split(flat, tokens, keys, max_chunks):
    import torch

    return {k: v.tolist() for k, v in zip(FIELDS, torch.split(flat, list(field_sizes(tokens, keys, max_chunks).values())))}


def test_padded_layout_puts_the_padding_in_a_sequence_of_its_own_at_scratch():
    # a fresh 5-token prompt in slot 3, then 3 tokens of slot 1 after 10 cached positions
    parts = [PrefillChunk(slot=3, start=0, length=5, offset=0), PrefillChunk(slot=1, start=10, length=3, offset=5)]
    got = split(padded_layout(parts, list(range(100, 108)), [4, 7], tokens=12, keys=24, scratch=99, max_chunks=3),
                12, 24, 3)
    assert got["ids"] == list(range(100, 108)) + [0] * 4
    assert got["positions"] == [0, 1, 2, 3, 4, 10, 11, 12, 0, 0, 0, 0]
    assert got["write_slots"] == [3] * 5 + [1] * 3 + [0] * 4
    assert got["write_pos"] == [0, 1, 2, 3, 4, 10, 11, 12, 99, 99, 99, 99]
    assert got["keep"] == [4, 7, 0]
    assert got["cu_q"] == [0, 5, 8, 12, 12]       # chunk ends, then the padding's 4 queries, then empty
    assert got["cu_k"] == [0, 5, 18, 22, 22]      # slot 1's chunk reads positions 0..12; the padding 4 keys
    assert got["key_slots"] == [3] * 5 + [1] * 13 + [0] * 6
    assert got["key_pos"] == [0, 1, 2, 3, 4] + list(range(13)) + [99] * 6
    with pytest.raises(ValueError):  # 18 keys + 4 of padding do not fit 20
        padded_layout(parts, list(range(8)), [4, 7], tokens=12, keys=20, scratch=99, max_chunks=3)


def test_the_smallest_bucket_that_fits_else_eager():
    graphs = PrefillGraphs(None, "cpu", scratch=99, max_tokens=256, graphs=False, max_chunks=2,
                           buckets=(64, 128, 256, 512))
    fresh = [PrefillChunk(0, 0, 70, 0)]
    assert graphs.choose(fresh, False) == (128, 128, False)
    later = [PrefillChunk(0, 100, 20, 0)]                       # 120 keys, 44 of padding: 164 > 64 x 2
    assert graphs.choose(later, True) == (128, 256, True)
    assert graphs.choose([PrefillChunk(0, 0, 300, 0)], False) is None              # past the budget's bucket
    assert graphs.choose([PrefillChunk(i, 0, 5, 5 * i) for i in range(3)], False) is None  # more chunks than 2
    graphs.failure = "RuntimeError: capture"
    assert graphs.choose(fresh, False) is None


def test_padded_prefill_equals_generate(make_engine, tiny_model, prompts):
    import torch

    # 64-token forwards: the 270-token prompt's later chunks read more keys than any bucket (eager),
    # the rest go through the padded forward; requests join mid-flight; the last one hits a stored prefix
    engine = make_engine(prefill_tokens=64, max_slots=4, prefill_graphs=True)
    graphs = engine.runner.prefill_graphs
    assert graphs.buckets == (64,) and not graphs.use_graphs
    body, calls = graphs.body, []
    graphs.body = lambda views, *a: calls.append(a) or body(views, *a)
    batch = prompts + [prompts[1] + [7]]
    seqs = joining_answers(engine, batch, max_new_tokens=12)
    assert [s.tokens for s in seqs] == [reference(tiny_model, p, max_new_tokens=12) for p in batch]
    assert {a[:2] for a in calls} == {(64, 64), (64, 128)}
    k0, v0 = engine.runner.cache.layer(0)
    assert torch.isfinite(k0[0, :, engine.runner.scratch]).all() and torch.isfinite(v0[0, :, engine.runner.scratch]).all()


def test_prefill_graphs_are_off_on_a_cpu_unless_asked(make_engine):
    assert make_engine().runner.prefill_graphs is None
