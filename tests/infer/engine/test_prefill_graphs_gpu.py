"""Prefill graphs on the GPU (`pytest -m gpu`; bench/run_gpu_tests.sh): a bf16 GLM-4 whose prefill
forwards are replayed from CUDA graphs gives the eager prefill's first-token logits (bf16 tolerance,
the same argmax but for near-ties) for fresh prompts, a chunk after cached positions and a forward of many prompts, and the
graphed engine answers as the eager one does."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, partial_rotary_factor=0.5, attention_bias=True,
             pad_token_id=0, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def model():
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return Glm4ForCausalLM(Glm4Config(**SHAPE)).to(torch.bfloat16).eval()


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1024, (length + i % 5,), generator=g).tolist() for i in range(n)]


def test_graph_prefill_equals_eager_prefill(model):
    from glmtune.infer.engine import EngineSettings, create_engine

    engine, _, _ = create_engine(model, stop_ids=[2], settings=EngineSettings(max_slots=40, max_model_len=1024,
                                                                             prefill_tokens=1024, compile=False))
    try:
        runner, graphs = engine.runner, engine.runner.prefill_graphs
        assert graphs is not None and graphs.use_graphs
        engine.warmup(widths=(128,))
        assert graphs.failure is None and len(graphs.graphs) == 2 * len(graphs.buckets)
        layouts = {"one prompt": [(0, _prompts(1, 150, 1)[0], 0, True)],
                   "30 prompts": [(s, p, 0, True) for s, p in enumerate(_prompts(30, 20, 2))],
                   "after 200 cached positions": [(35, _prompts(1, 90, 3)[0], 200, True)]}
        with runner.lock, torch.inference_mode():
            # slot 35's first 200 positions: a prompt's earlier chunk, written by an eager forward
            runner.prefill_graphs = None
            runner._prefill_forward([(35, _prompts(1, 200, 4)[0], 0, False)])
            run, replayed = graphs.run, []
            graphs.run = lambda key, flat: replayed.append(key) or run(key, flat)
            for name, chunks in layouts.items():
                runner.prefill_graphs = graphs
                captured = len(graphs.graphs)
                graphed = runner._prefill_forward(chunks)[0].float().clone()
                assert len(graphs.graphs) == captured and replayed, f"{name}: no captured graph replayed"
                replayed.clear()
                runner.prefill_graphs = None
                eager = runner._prefill_forward(chunks)[0].float()
                scale = eager.abs().max()
                assert (graphed - eager).abs().max() <= 0.05 * scale, name
                agree = (graphed.argmax(-1) == eager.argmax(-1)).float().mean().item()
                assert agree >= 0.9, f"{name}: argmax agrees on {agree:.0%} of rows"  # bf16 near-ties aside
            runner.prefill_graphs = graphs
    finally:
        engine.close()


def test_graphed_engine_answers_as_the_eager_engine(model):
    from glmtune.infer.engine import EngineSettings, create_engine

    prompts = _prompts(12, 40, 5)
    answers = {}
    for graphs in (False, True):
        engine, _, _ = create_engine(model, stop_ids=[2], settings=EngineSettings(
            max_slots=16, max_model_len=512, prefill_tokens=512, compile=False, cuda_graphs=graphs))
        try:
            seqs = [engine.submit(p, max_new_tokens=8) for p in prompts]
            for s in seqs:
                assert s.done.wait(300)
            answers[graphs] = [s.tokens for s in seqs]
            assert (engine.runner.prefill_graphs is not None) == graphs
        finally:
            engine.close()
    same = sum(a == b for a, b in zip(answers[False], answers[True]))
    assert same >= len(prompts) - 1  # bf16: a near-tie may flip one greedy token
