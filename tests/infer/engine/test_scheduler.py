"""The engine against transformers' generate: greedy answers equal token for token, whatever shares
the batch, joins mid-flight, is chunked or reuses a cached prefix; and it survives what clients do."""
from __future__ import annotations

import threading
import time

import pytest
from engine_refs import STOP, joining_answers, reference

from glmtune.errors import InputError


def answers(engine, prompts, **gen):
    seqs = [engine.submit(p, **{"max_new_tokens": 16, **gen}) for p in prompts]
    for s in seqs:
        assert s.done.wait(120)
    return seqs


def test_greedy_batch_equals_generate(make_engine, tiny_model, prompts):
    engine = make_engine()
    seqs = answers(engine, prompts)
    for p, s in zip(prompts, seqs):
        assert s.tokens == reference(tiny_model, p)
        assert s.finish_reason == ("stop" if s.tokens[-1] in STOP else "length")


def test_requests_joining_mid_flight_and_chunked_prefill(make_engine, tiny_model, prompts):
    # 64-token prefill forwards: the 270-token prompt takes five turns, decoding the others between them
    engine = make_engine(prefill_tokens=64, max_slots=4)
    seqs = joining_answers(engine, prompts, wait_s=120)
    assert [s.tokens for s in seqs] == [reference(tiny_model, p) for p in prompts]
    assert engine.steps > 16  # more requests than slots: later ones waited, then decoded


def test_a_shared_prefix_is_computed_once(make_engine, tiny_model, prompts):
    engine = make_engine()
    first = answers(engine, prompts[:2])          # the 64-token block prefix is seen twice: stored
    assert [length for _, length in engine.prefix.stored.values()] == [64]
    calls = []
    real_prefill = engine.runner._prefill

    def spy(chunks, sampling, rows):
        calls.append([(start, len(ids)) for _, ids, start, _ in chunks])
        return real_prefill(chunks, sampling, rows)

    engine.runner._prefill = spy
    later = answers(engine, prompts[2:4])
    assert calls == [[(64, len(prompts[2]) - 64), (64, len(prompts[3]) - 64)]]  # only past the prefix
    for p, s in zip(prompts, first + later):
        assert s.tokens == reference(tiny_model, p)


def test_repetition_penalty_equals_generate(make_engine, tiny_model, prompts):
    s, = answers(make_engine(), prompts[:1], repetition_penalty=1.3)
    assert s.tokens == reference(tiny_model, prompts[0], repetition_penalty=1.3)


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine, prompts):
    engine = make_engine()
    gen = dict(temperature=0.9, top_p=0.95, top_k=100)
    alone, = answers(engine, prompts[:1], seed=7, **gen)
    crowd = answers(engine, prompts[:1] * 3 + prompts[1:3], seed=7, **gen)
    other, = answers(engine, prompts[:1], seed=8, **gen)
    assert all(s.tokens == alone.tokens for s in crowd[:3])
    assert other.tokens != alone.tokens
    # a top-k of one leaves nothing to draw from: the greedy answer
    greedy, one = answers(engine, prompts[:1]) + answers(engine, prompts[:1], temperature=1.0, top_k=1)
    assert one.tokens == greedy.tokens


def test_cancel_frees_the_slot_at_once(make_engine, prompts):
    engine = make_engine(max_slots=2)
    cancel = threading.Event()
    long = engine.submit(prompts[0], max_new_tokens=1500, cancel=cancel)
    time.sleep(0.2)
    cancel.set()
    assert long.done.wait(10) and long.finish_reason == "cancelled"
    s, = answers(engine, prompts[1:2])
    assert s.finish_reason in ("stop", "length") and engine.load["running"] == 0


def test_a_failing_request_fails_alone(make_engine, tiny_model, prompts):
    engine = make_engine()
    boom = engine.submit(prompts[0], max_new_tokens=16, on_update=lambda s: 1 / 0)
    ok = answers(engine, prompts[1:3])
    assert boom.done.wait(30) and boom.finish_reason == "error" and isinstance(boom.error, ZeroDivisionError)
    assert [s.tokens for s in ok] == [reference(tiny_model, p) for p in prompts[1:3]]


def test_a_failing_step_fails_its_requests_and_the_loop_lives_on(make_engine, tiny_model, prompts, monkeypatch):
    engine = make_engine()
    real = engine.runner._prefill
    monkeypatch.setattr(engine.runner, "_prefill", lambda *a: (_ for _ in ()).throw(RuntimeError("device fault")))
    bad, = answers(engine, prompts[:1])
    assert bad.finish_reason == "error" and "device fault" in str(bad.error)
    monkeypatch.setattr(engine.runner, "_prefill", real)
    good, = answers(engine, prompts[1:2])
    assert good.tokens == reference(tiny_model, prompts[1]) and engine.alive


def test_a_prompt_longer_than_a_slot_is_refused(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(InputError, match="the prompt is 64 tokens; the engine holds 64"):
        engine.submit(list(range(64)), max_new_tokens=4)
    s = engine.submit(list(range(60)), max_new_tokens=100)   # the answer gets what the slot has left
    assert s.done.wait(60) and len(s.tokens) <= 4


def test_compile_is_on_when_asked_and_by_default_only_on_cuda(tiny_model):
    from glmtune.infer.engine import compile_choice

    assert compile_choice(tiny_model, None, graphs=False) is False  # serve's default: CUDA only
    assert compile_choice(tiny_model, True, graphs=False) is True   # asked: a CPU compiles too
    assert compile_choice(tiny_model, False, graphs=True) is False
