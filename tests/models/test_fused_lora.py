"""Fused LoRA (glmtune.models.fused_lora) against PEFT's own layers: same loss and same gradients for
every LoRA weight (fp32, 1e-5), on tiny GLM-4 (fused gate_up_proj, q/k/v bias) and Llama (separate
gate/up) models; and the cases that must fall back to PEFT's forward."""
from __future__ import annotations

import pytest
import torch

from glmtune.models.fused_lora import LoraLinearFunction, SwiGLULoraDownFunction, fuse_lora, unfuse_lora

TARGETS = {"glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def tiny_peft(family: str, dtype=torch.float32, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4Config, Glm4ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    if family == "glm4":
        model = Glm4ForCausalLM(Glm4Config(**shape, head_dim=16, partial_rotary_factor=0.5, attention_bias=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model = model.to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS[family],
                                             init_lora_weights=False), autocast_adapter_dtype=False)
    model.train()
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["glm4", "llama"])
def test_fused_equals_peft_fp32(family):
    model = tiny_peft(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    counts = fuse_lora(model)
    n_linear = len(TARGETS[family]) * 2
    assert counts == {"linear": n_linear, "mlp": 2, "fused": n_linear}  # fp32 adapters on fp32: all fused
    forwards = [m.forward for m in model.modules() if hasattr(m, "_glmtune_peft_forward")]
    assert fuse_lora(model) == counts  # idempotent: counted again, patched once
    assert forwards == [m.forward for m in model.modules() if hasattr(m, "_glmtune_peft_forward")]
    loss, grads = loss_and_grads(model, ids)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * n_linear
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-5), name
    unfuse_lora(model)
    assert not any(hasattr(m, "_glmtune_peft_forward") for m in model.modules())
    again, _ = loss_and_grads(model, ids)
    assert float(again) == float(ref_loss)


def test_functions_match_reference_bf16():
    """bf16 at the GLM-4 proportions the kernels see, against the same maths in fp32 (1e-2)."""
    torch.manual_seed(0)
    x = torch.randn(37, 64, requires_grad=True)
    w, bias = torch.randn(96, 64) / 8, torch.randn(96)
    a, b = (torch.randn(8, 64) / 8).requires_grad_(), (torch.randn(96, 8) / 8).requires_grad_()

    def ref(x, a, b):
        return x @ w.t() + bias + 2.0 * (x @ a.t()) @ b.t()

    gy = torch.randn(37, 96)
    leaves = (x, a, b)
    ref_out = ref(*leaves)
    ref_g = torch.autograd.grad(ref_out, leaves, gy)
    low = [t.detach().bfloat16().requires_grad_() for t in leaves]
    out = LoraLinearFunction.apply(low[0], w.bfloat16(), bias.bfloat16(), low[1], low[2], 2.0)
    got_g = torch.autograd.grad(out, low, gy.bfloat16())
    scale = ref_out.abs().max()
    assert (out.float() - ref_out).abs().max() / scale < 1e-2
    for g, r in zip(got_g, ref_g):
        assert (g.float() - r).abs().max() / r.abs().max() < 1e-2

    gate, up = torch.randn(37, 48, requires_grad=True), torch.randn(37, 48, requires_grad=True)
    wd, ad, bd = torch.randn(64, 48) / 7, (torch.randn(8, 48) / 7).requires_grad_(), (torch.randn(64, 8) / 7).requires_grad_()

    def ref_down(gate, up, ad, bd):
        h = torch.nn.functional.silu(gate) * up
        return h @ wd.t() + 2.0 * (h @ ad.t()) @ bd.t()

    leaves = (gate, up, ad, bd)
    gy = torch.randn(37, 64)
    ref_out = ref_down(*leaves)
    ref_g = torch.autograd.grad(ref_out, leaves, gy)
    low = [t.detach().bfloat16().requires_grad_() for t in leaves]
    out = SwiGLULoraDownFunction.apply(low[0], low[1], wd.bfloat16(), low[2], low[3], 2.0)
    got_g = torch.autograd.grad(out, low, gy.bfloat16())
    assert (out.float() - ref_out).abs().max() / ref_out.abs().max() < 1e-2
    for g, r in zip(got_g, ref_g):
        assert (g.float() - r).abs().max() / r.abs().max() < 1e-2


def test_falls_back_to_peft_where_fusion_does_not_hold():
    # dropout in training mode: PEFT's path (a random mask), so fusing must not change the output law
    model = tiny_peft("glm4", dropout=0.5)
    fuse_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    orig = layer._glmtune_peft_forward
    layer._glmtune_peft_forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    x = torch.randn(1, 3, 64)
    layer(x)
    assert calls == [1]
    model.eval()  # dropout off in eval: fused again
    layer(x)
    assert calls == [1]
    # adapters disabled: the base layer alone
    with model.disable_adapter():
        y = layer(x)
        assert calls == [1, 1]
        assert torch.allclose(y, layer.base_layer(x))
    # fp32 adapters on a bf16 base (PEFT's default autocast): mixed precision stays on PEFT's path
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4Config, Glm4ForCausalLM

    base = Glm4ForCausalLM(Glm4Config(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16, num_hidden_layers=1, vocab_size=64, pad_token_id=0)).to(torch.bfloat16)
    mixed = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    assert fuse_lora(mixed) == {"linear": 1, "mlp": 0, "fused": 0}  # counted as not running fused
    q = mixed.base_model.model.model.layers[0].self_attn.q_proj
    from glmtune.models.fused_lora import _lora_parts
    assert q.lora_A["default"].weight.dtype == torch.float32 and _lora_parts(q) is None
