"""The prefill's compiled regions (norms, MLP, rotary): answers equal transformers' generate across
chunked, joining and prefix-reusing prefills, and new prompt layouts do not make new compiles."""
from __future__ import annotations

from engine_refs import joining_answers, reference


def _variants(fn) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_compiled_prefill_regions_equal_generate_and_compile_few_variants(make_engine, tiny_model, prompts):
    from glmtune.infer.engine.regions import mlp_forward, norm_forward, rotary_forward

    engine = make_engine(prefill_tokens=64, max_slots=4, compile_prefill=True)
    regions = engine.runner.regions
    layers = tiny_model.config.num_hidden_layers
    assert len(regions.modules) == 5 * layers  # four norms and the MLP of each GLM-4 layer
    assert len(regions.rotary) == 1
    def run(batch):
        seqs = joining_answers(engine, batch, max_new_tokens=12)
        assert [s.tokens for s in seqs] == [reference(tiny_model, p, max_new_tokens=12) for p in batch]

    # the first compile at 64 tokens, as many as the tiny model is wide, and one of one token: the two
    # variants (tying the token count to the width would make the first a 64-token-only variant)
    run([prompts[5][:64]])
    run([prompts[0][:1]])
    counts = [_variants(f) for f in (norm_forward, mlp_forward, rotary_forward)]
    # then chunks of many token counts (64-token slices of the 270-token prompt, tails of 2-30 tokens,
    # a prefix hit + 11 tokens) make no new compile
    run(prompts + [prompts[1] + [7]])
    assert regions.failure is None
    assert "the prefill's norms, MLP and rotary are compiled" in engine.graphs_note
    assert [_variants(f) for f in (norm_forward, mlp_forward, rotary_forward)] == counts


def test_regions_are_off_unless_compiling(make_engine):
    engine = make_engine()
    assert engine.runner.regions is None
