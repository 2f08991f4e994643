"""Grouped expert LoRA (glmtune.models.expert_lora) against PEFT's own ParamWrapper forward: same loss
and same gradient for every LoRA weight (fp32, 1e-5) on tiny Glm4Moe and Glm4MoeLite models, the
grouped GEMM's loop fallback against torch's kernel, and the cases that fall back to PEFT."""
from __future__ import annotations

import pytest
import torch

from glmtune.models.expert_lora import fuse_expert_lora, grouped_mm, unfuse_expert_lora
from glmtune.models.fused_lora import fuse_lora


def tiny_moe_peft(lite: bool, *, train_router: bool = False):
    from peft import get_peft_model
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    from glmtune.models.peft_setup import moe_lora_config
    from glmtune.models.tiny import TINY_GLM4_MOE, TINY_GLM4_MOE_LITE
    from glmtune.train.config import MethodSection

    shape = dict(TINY_GLM4_MOE_LITE if lite else TINY_GLM4_MOE, vocab_size=128, pad_token_id=0, eos_token_id=1)
    shape.pop("partial_rotary_factor", None)
    torch.manual_seed(0)
    model = (Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**shape)) if lite
             else Glm4MoeForCausalLM(Glm4MoeConfig(**shape)))
    with torch.no_grad():  # spread the routing (random 0.02 weights tie at sigmoid(0))
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    cfg = moe_lora_config(model, MethodSection(r=8, alpha=16, train_router=train_router))
    cfg.init_lora_weights = False  # B != 0, so the LoRA term is tested, not only the base
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    model.train()
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def count_grouped_calls(monkeypatch) -> list:
    import glmtune.models.expert_lora as el

    calls, real = [], el.experts_lora_forward
    monkeypatch.setattr(el, "experts_lora_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("lite", [False, True], ids=["glm4_moe", "glm4_moe_lite"])
def test_grouped_expert_lora_equals_peft(lite, monkeypatch):
    model = tiny_moe_peft(lite)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    assert fuse_expert_lora(model) == 2 == fuse_expert_lora(model)  # two MoE layers; idempotent
    calls = count_grouped_calls(monkeypatch)
    loss, grads = loss_and_grads(model, ids)
    assert len(calls) == 2  # both MoE layers ran the grouped path, not PEFT's
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    expert_grads = [n for n in grads if ".experts." in n]
    assert len(expert_grads) == 2 * 2 * 2  # 2 layers x (gate_up_proj, down_proj) x (A, B)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # with the linear LoRA fused as well (attention, dense and shared-expert MLPs: PEFT parameter targets)
    counts = fuse_lora(model)
    assert counts["fused"] == counts["linear"] > 0 and counts["mlp"] == 3  # dense MLP + 2 shared experts
    both, grads2 = loss_and_grads(model, ids)
    assert abs(float(both) - float(ref_loss)) < 1e-5
    for name, g in grads2.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    unfuse_expert_lora(model)
    from glmtune.models.fused_lora import unfuse_lora
    unfuse_lora(model)
    assert not any(hasattr(m, "_glmtune_peft_forward") for m in model.modules())
    again, _ = loss_and_grads(model, ids)
    assert float(again) == float(ref_loss)


def test_falls_back_to_peft_when_merged_or_disabled(monkeypatch):
    model = tiny_moe_peft(False)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    fuse_expert_lora(model)
    calls = count_grouped_calls(monkeypatch)
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        assert len(calls) == 2
        with model.disable_adapter():  # disabled: the base model, through PEFT's forward
            base = model(input_ids=ids).logits
        model.merge_adapter()          # merged: PEFT's forward on the merged weights
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert len(calls) == 2  # neither of those ran the grouped path
    assert not torch.allclose(fused, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, fused, atol=1e-5, rtol=1e-5)


def test_grouped_mm_loop_fallback_equals_kernel():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 8, generator=g), torch.randn(3, 8, 4, generator=g)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # expert 1 gets no rows
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    torch.testing.assert_close(grouped_mm(x, w, offs), ref)
    # odd widths (6 fp32 values = 24-byte rows) miss the kernel's 16-byte alignment: the loop runs
    x6, w6 = torch.randn(10, 6, generator=g), torch.randn(3, 6, 5, generator=g)
    torch.testing.assert_close(grouped_mm(x6, w6, offs), torch.cat([x6[:3] @ w6[0], x6[3:] @ w6[2]]))


def test_experts_function_equals_loop_over_experts():
    """ExpertsLoraFunction (keeps gate/up only, recomputes the rest) against a plain loop over experts
    through autograd: output and the gradients of the input, the routing weights and all four LoRA
    weights in PEFT's layout; one expert gets no token."""
    from glmtune.models.expert_lora import ExpertsLoraFunction

    g = torch.Generator().manual_seed(3)
    tokens, k, hidden, inter, e, r = 7, 2, 8, 6, 4, 2
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 1], [3, 1], [1, 0], [0, 3]])  # expert 2: no tokens
    wts = torch.rand(tokens, k, generator=g, requires_grad=True)
    w_gu, w_d = torch.randn(e, 2 * inter, hidden, generator=g), torch.randn(e, hidden, inter, generator=g)
    lora = [torch.randn(*shape, generator=g, requires_grad=True) for shape in
            ((e * r, hidden), (2 * inter, r * e), (e * r, inter), (hidden, r * e))]
    s_gu, s_d = 0.5, 2.0

    def loop():
        a_gu, b_gu, a_d, b_d = lora
        out = torch.zeros(tokens, hidden)
        for t in range(tokens):
            for j in range(k):
                ex = int(idx[t, j])
                ag, bg = a_gu[ex * r:(ex + 1) * r], b_gu[:, ex::e]          # PEFT's layout
                ad, bd = a_d[ex * r:(ex + 1) * r], b_d[:, ex::e]
                h = x[t] @ w_gu[ex].t() + s_gu * (x[t] @ ag.t()) @ bg.t()
                gate, up = h.chunk(2)
                a = torch.nn.functional.silu(gate) * up
                out[t] = out[t] + wts[t, j] * (a @ w_d[ex].t() + s_d * (a @ ad.t()) @ bd.t())
        return out

    probe = torch.randn(tokens, hidden, generator=g)
    inputs = [x, wts, *lora]
    ref = loop()
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    out = ExpertsLoraFunction.apply(x, idx, wts, w_gu.transpose(1, 2), w_d.transpose(1, 2), *lora, s_gu, s_d)
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(["x", "weights", "A_gu", "B_gu", "A_d", "B_d"], grads, ref_grads):
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=name)
