"""Fused sibling projections (q/k/v, gate/up as one GEMM): the same logits and tokens as the
model's own layers, no more parameters, and the serving back-end fuses the models it loads."""
from __future__ import annotations

import pytest
from engine_refs import STOP, reference


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_fused_glm4_has_the_same_logits_and_parameters(random_glm4_dir, prompts):
    import torch

    from glmtune.infer.engine import fuse_projections
    from glmtune.models.loading import load_model

    plain, fused = (load_model(random_glm4_dir, dtype="float32").eval() for _ in range(2))
    before = _numel(fused)
    layers = fused.config.num_hidden_layers
    assert fuse_projections(fused) == layers  # q/k/v of each layer (GLM-4's gate_up_proj is one already)
    assert type(fused.model.layers[0].self_attn.k_proj).__name__ == "ProjectionPart"
    assert _numel(fused) == before
    torch.testing.assert_close(_logits(fused, prompts[5]), _logits(plain, prompts[5]), rtol=1e-5, atol=1e-5)
    assert fused.model.layers[0].self_attn.q_proj.kept.x is None  # the last part let go of the output


def test_fused_llama_gate_up_and_qkv_equal_and_parts_alone_are_right():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmtune.infer.engine import fuse_projections

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, attention_bias=True)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()
    fused = LlamaForCausalLM(config).eval()
    fused.load_state_dict(plain.state_dict())
    v_weight = plain.model.layers[1].self_attn.v_proj.weight.clone()
    assert fuse_projections(fused) == 4  # q/k/v and gate/up of both layers
    ids = list(range(3, 40))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)
    # a part called on an input its group did not just see computes its own rows
    x = torch.randn(2, 5, 64)
    v = fused.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(v(x), x @ v_weight.T + plain.model.layers[1].self_attn.v_proj.bias, rtol=1e-5,
                               atol=1e-5)


def test_layers_that_are_not_plain_linear_are_left_alone(random_glm4_dir):
    from peft import LoraConfig, get_peft_model

    from glmtune.infer.engine import fuse_projections
    from glmtune.models.loading import load_model

    model = get_peft_model(load_model(random_glm4_dir, dtype="float32"),
                           LoraConfig(r=4, target_modules=["k_proj"]))
    assert fuse_projections(model) == 0


def test_engine_on_a_fused_model_equals_generate(make_engine, random_glm4_dir, tiny_model, prompts):
    from glmtune.infer.engine import fuse_projections
    from glmtune.models.loading import load_model

    fused = load_model(random_glm4_dir, dtype="float32").eval()
    fuse_projections(fused)
    engine = make_engine(model=fused)
    seqs = [engine.submit(p, max_new_tokens=16) for p in prompts]
    for s in seqs:
        assert s.done.wait(120)
    assert [s.tokens for s in seqs] == [reference(tiny_model, p) for p in prompts]


@pytest.mark.parametrize("fuse", [True, False])
def test_the_backend_fuses_the_model_it_loads(fuse, random_glm4_dir, prompts):
    from glmtune.infer.backends import GenConfig, HFBackend
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer

    backend = HFBackend(random_glm4_dir, load_tokenizer(random_glm4_dir), {}, device="cpu", dtype="float32",
                        engine={"fuse_projections": fuse})
    try:
        out = backend.generate([prompts[1]], None, STOP, GenConfig(max_new_tokens=12))
        kind = type(backend.model.model.layers[0].self_attn.q_proj).__name__
        assert kind == ("FusedProjection" if fuse else "Linear")
        assert ("fused projection groups" in backend.engine_summary) is fuse
        plain = load_model(random_glm4_dir, dtype="float32").eval()
        expected = reference(plain, prompts[1], max_new_tokens=12)
        assert out[0].token_ids == (expected[:-1] if expected[-1] in STOP else expected)
    finally:
        backend.close()
