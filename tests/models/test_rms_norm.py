"""glmtune.models.rms_norm against transformers' RMSNorm: the same output bit for bit, the same
gradients, less kept for backward; and which modules fuse_rms_norms switches."""
from __future__ import annotations

import pytest
import torch

from glmtune.models.rms_norm import RMSNormFunction, fuse_rms_norms, is_fused, unfuse_rms_norms


def glm_norm(width: int, dtype):
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteRMSNorm

    norm = Glm4MoeLiteRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(1)))
    return norm


def saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_same_output_and_gradients(dtype, tol):
    norm = glm_norm(64, dtype)
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
    probe = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = norm(x)
    ref_gx, ref_gw = torch.autograd.grad((ref * probe).sum(), [x, norm.weight])
    out = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    gx, gw = torch.autograd.grad((out * probe).sum(), [x, norm.weight])
    assert torch.equal(out, ref)  # the same ops in the same order
    torch.testing.assert_close(gx.float(), ref_gx.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(gw.float(), ref_gw.float(), atol=tol * 10, rtol=tol)


def test_keeps_the_bf16_input_not_an_fp32_copy():
    norm = glm_norm(256, torch.bfloat16).requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(32, 256).to(torch.bfloat16).requires_grad_()
    theirs = saved_bytes(lambda: norm(x))
    ours = saved_bytes(lambda: RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon))
    weight = 256 * 2
    assert theirs - weight >= 32 * 256 * 4            # the fp32 copy of the input
    assert ours - weight == 32 * 256 * 2 + 32 * 4     # the bf16 input and one fp32 rstd per row


def test_fuse_switches_llama_style_norms_only():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = torch.nn.ModuleDict({"a": glm_norm(16, torch.float32), "b": glm_norm(16, torch.float32),
                                 "gemma": GemmaRMSNorm(16), "linear": torch.nn.Linear(16, 16)})
    x = torch.randn(2, 16)
    before = model["a"](x)
    assert fuse_rms_norms(model) == 2 == fuse_rms_norms(model)  # Gemma's (1 + weight) is not this norm
    assert is_fused(model["a"]) and not is_fused(model["gemma"])
    assert torch.equal(model["a"](x), before)
    # transformers with the kernels package pops instance forwards on train()/eval(); a class stays
    model["a"].__dict__.pop("forward", None)
    calls = []
    real = RMSNormFunction.apply
    RMSNormFunction.apply = lambda *a: calls.append(1) or real(*a)
    try:
        model["a"](x)
    finally:
        RMSNormFunction.apply = real
    assert calls == [1]
    unfuse_rms_norms(model)
    assert not any(is_fused(m) for m in model.modules())
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteRMSNorm
    assert type(model["a"]) is Glm4MoeLiteRMSNorm and type(model["b"]) is Glm4MoeLiteRMSNorm
