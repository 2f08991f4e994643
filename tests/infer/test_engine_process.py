"""The generation engine in its own process (glmtune.infer.engine_process): the same answers as in
process, streaming, cancels reaching the child, and a dead child reported instead of hanging."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tiny_trained import QA


@pytest.fixture(scope="module")
def remote_predictor(trained_glm4_dir):
    from glmtune import Predictor

    p = Predictor(trained_glm4_dir, backend="hf-process", max_new_tokens=24)
    yield p
    p.close()


def test_answers_equal_the_in_process_engine(remote_predictor, trained_predictor):
    assert remote_predictor.backend.engine_problem is None
    got = [remote_predictor(q) for q, _ in QA]
    assert got == [trained_predictor(q, max_new_tokens=24) for q, _ in QA] == [a for _, a in QA]
    # a batch runs its prompts together in the child, in order
    assert remote_predictor.batch([q for q, _ in QA], batch_size=4) == [a for _, a in QA]
    pieces = list(remote_predictor.stream(QA[0][0]))
    assert len(pieces) > 1 and "".join(pieces) == QA[0][1]
    assert "in its own process (pid " in remote_predictor.backend.engine_summary
    assert remote_predictor.backend.context_length == trained_predictor.backend.model.config.max_position_embeddings


def test_bad_prompt_and_adapter_are_input_errors(remote_predictor):
    from glmtune.errors import InputError

    engine = remote_predictor.backend.engine(remote_predictor.stop_ids)
    with pytest.raises(InputError, match="the prompt is empty"):
        engine.submit([], max_new_tokens=4)
    with pytest.raises(InputError, match="no adapter named 'nope'"):
        remote_predictor("hi", adapter="nope")


def test_cancel_reaches_the_child_and_frees_its_slot(remote_predictor):
    engine = remote_predictor.backend.engine(remote_predictor.stop_ids)
    prompt = remote_predictor.prompt_ids(remote_predictor.messages_for(QA[0][0]))
    cancel = threading.Event()
    first = threading.Event()
    # the stop ids are left out of nothing: max_new_tokens large, so only the cancel ends it early
    seq = engine.submit(prompt, max_new_tokens=1500, temperature=1.0, seed=1, cancel=cancel,
                        on_update=lambda s: first.set())
    assert first.wait(60)
    cancel.set()
    assert seq.done.wait(30)
    assert seq.finish_reason in ("cancelled", "stop") and len(seq.tokens) < 1500
    # the engine answers on afterwards
    assert remote_predictor(QA[1][0]) == QA[1][1]


def test_a_dead_child_fails_requests_and_alive_turns_false(trained_glm4_dir):
    from glmtune import Predictor
    from glmtune.infer.engine_process import EngineProcessError

    p = Predictor(trained_glm4_dir, backend="hf-process", max_new_tokens=24)
    try:
        engine = p.backend.engine(p.stop_ids)
        assert engine.alive
        prompt = p.prompt_ids(p.messages_for(QA[0][0]))
        seq = engine.submit(prompt, max_new_tokens=1500, temperature=1.0, seed=2)
        os.kill(p.backend.pid, signal.SIGKILL)
        assert seq.done.wait(30)
        assert seq.finish_reason == "error" and isinstance(seq.error, EngineProcessError)
        deadline = time.time() + 10
        while engine.alive and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.alive and "exited" in engine.error
        with pytest.raises(EngineProcessError, match="has stopped"):
            engine.submit(prompt, max_new_tokens=4)
    finally:
        p.close()


def test_engine_process_choice(trained_glm4_dir):
    from glmtune.cli.serve import engine_process_choice
    from glmtune.errors import InputError

    with pytest.raises(InputError, match="--engine off"):
        engine_process_choice(True, backend="hf", engine="off", model=".")
    assert engine_process_choice(None, backend="vllm", engine="auto", model=".") is False
    assert engine_process_choice(False, backend="hf", engine="auto", model=trained_glm4_dir) is False
    # auto: on with a CUDA GPU only (the CI machine has none)
    assert engine_process_choice(None, backend="hf", engine="auto", model=trained_glm4_dir) is False
