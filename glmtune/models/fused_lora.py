"""Fused LoRA for training (issue 6): fewer kernels and fewer saved activations than PEFT's layers.

PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: five kernels forward
(the product by `scaling` and the sum each write a full output-sized tensor) and more backward, each one
a Python dispatch. Profiling GLM-4-9B showed the step spending its time there (bench/RESULTS.md). Here:

* `LoraLinearFunction`: y = x Wᵀ (+ bias), then y += s·(x Aᵀ) Bᵀ as one GEMM whose epilogue adds into y
  (`addmm_`, beta = 1). Backward: two GEMMs for dx (the second also accumulates in place) and two small
  ones for dA, dB. It saves x (which the base layer's caller keeps anyway) and the (tokens x r) x Aᵀ.
* `SwiGLULoraDownFunction`: down_proj(silu(gate) * up) with LoRA, saving gate and up only: the
  (tokens x intermediate) product is recomputed in backward (elementwise) instead of being kept for the
  whole step — 13,696 values per token per layer less for GLM-4-9B.

Both hold for the usual training set-up: one active adapter, no dropout (or eval mode), no DoRA or
other variant, not merged, the adapter in the base layer's dtype (`speed.adapter_dtype: model`, or
all fp32 on a CPU). A layer outside that falls back to PEFT's own forward on that call, so results
never depend on the lever. QLoRA: the 4-bit weight is dequantised (bitsandbytes) where it is used,
as bitsandbytes' own matmul does for more than one token.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

__all__ = ["LoraLinearFunction", "SwiGLULoraDownFunction", "fuse_lora", "is_silu", "unfuse_lora"]


def _dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The base weight as a dense matrix: dequantised when it is a bitsandbytes 4-bit parameter."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + bias + s (x Aᵀ) Bᵀ with W (and bias) frozen; grads for x, A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = _flat(x)
        w = _dense_weight(weight)
        xa = x2 @ lora_a.t()
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        y.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.weight, ctx.scaling = weight, scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        gy = _flat(grad_y)
        g_xa = (gy @ lora_b).mul_(s)
        grad_b = (gy.t() @ xa).mul_(s) if ctx.needs_input_grad[4] else None
        grad_a = g_xa.t() @ _flat(x) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gy @ _dense_weight(ctx.weight)
            grad_x.addmm_(g_xa, lora_a)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """d/dgate and d/dup of silu(gate) * up, computed in fp32 (as liger-kernel's kernel does)."""
    g, u, gh = gate.float(), up.float(), grad_h.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    d_gate = gh * u * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), (gh * silu).to(up.dtype)


class SwiGLULoraDownFunction(torch.autograd.Function):
    """down(silu(gate) * up) with a LoRA down projection; keeps gate and up, recomputes the product."""

    @staticmethod
    def forward(ctx, gate, up, weight, lora_a, lora_b, scaling: float):
        h = _flat(swiglu(gate, up))
        w = _dense_weight(weight)
        ha = h @ lora_a.t()
        y = h @ w.t()
        y.addmm_(ha, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(gate, up, ha, lora_a, lora_b)
        ctx.weight, ctx.scaling = weight, scaling
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, ha, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        gy = _flat(grad_y)
        h = _flat(swiglu(gate, up))  # recomputed: elementwise, instead of kept from forward
        g_ha = (gy @ lora_b).mul_(s)
        grad_b = (gy.t() @ ha).mul_(s) if ctx.needs_input_grad[4] else None
        grad_a = g_ha.t() @ h if ctx.needs_input_grad[3] else None
        del h
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = gy @ _dense_weight(ctx.weight)
            grad_h.addmm_(g_ha, lora_a)
            grad_gate, grad_up = swiglu_backward(grad_h.view(gate.shape), gate, up)
        return grad_gate, grad_up, None, grad_a, grad_b, None


# ---------------------------------------------------------------------------------------------------
# Patching PEFT models

def _lora_parts(module):
    """(weight, bias, A, B, scaling) when this PEFT LoRA layer can take the fused path now; else None."""
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", True):
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    dropout = module.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training:
        return None
    base = module.base_layer
    weight, a, b = base.weight, module.lora_A[name].weight, module.lora_B[name].weight
    compute = a.dtype
    quant_state = getattr(weight, "quant_state", None)
    dense_dtype = quant_state.dtype if quant_state is not None else weight.dtype  # 4-bit: dequantised dtype
    if b.dtype != compute or dense_dtype != compute:
        return None  # mixed precision (fp32 adapters on a bf16 base): PEFT's path casts; keep it
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    return weight, getattr(base, "bias", None), a, b, float(module.scaling[name])


def _fused_linear_forward(self, x, *args, **kwargs):
    parts = None if args or kwargs else _lora_parts(self)
    if parts is None or x.dtype != parts[2].dtype:
        return self._glmtune_peft_forward(x, *args, **kwargs)
    weight, bias, a, b, s = parts
    return LoraLinearFunction.apply(x, weight, bias, a, b, s)


def _fused_mlp_forward(self, hidden_states):
    """Gated MLP (GLM-4's fused gate_up_proj, or Llama / Qwen gate_proj + up_proj) with the SwiGLU
    product recomputed in the down projection's backward."""
    down = self.down_proj
    parts = _lora_parts(down)
    if parts is None or parts[1] is not None:
        return self._glmtune_peft_forward(hidden_states)
    if hasattr(self, "gate_up_proj"):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(hidden_states), self.up_proj(hidden_states)
    if gate.dtype != parts[2].dtype:
        return down(swiglu(gate, up))
    weight, _, a, b, s = parts
    return SwiGLULoraDownFunction.apply(gate, up, weight, a, b, s)


def _is_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    base = getattr(module, "base_layer", None)
    if not isinstance(module, LoraLayer) or base is None:
        return False
    return isinstance(base, torch.nn.Linear) or type(base).__name__ == "Linear4bit"


def _is_silu_gated_mlp(module) -> bool:
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    gated = hasattr(module, "gate_up_proj") or (hasattr(module, "gate_proj") and hasattr(module, "up_proj"))
    return gated and hasattr(module, "down_proj") and _is_lora_linear(module.down_proj) and \
        is_silu(act) and type(module).__name__.endswith("MLP")


def is_silu(act) -> bool:
    # transformers' SiLUActivation (newer releases) or torch's nn.SiLU (older ones)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _patch(module, fn) -> None:
    module._glmtune_peft_forward = module.forward
    module.forward = types.MethodType(fn, module)


def fuse_lora(model) -> dict:
    """Route a PEFT model's LoRA linears (and SiLU-gated MLPs) through the fused functions.

    Returns counts {"linear": n, "mlp": m, "fused": k}: patched LoRA linears and gated MLPs, and how many
    of the LoRA linears take the fused path now (the others fall back to PEFT's forward per call: mixed
    adapter / base dtypes, dropout in training mode, several active adapters). Idempotent;
    `unfuse_lora` restores PEFT's forwards. Must run before torch.compile of the layers (compile
    traces whichever forward is in place).
    """
    counts = {"linear": 0, "mlp": 0, "fused": 0}
    for module in model.modules():
        if _is_lora_linear(module):
            counts["linear"] += 1
            counts["fused"] += _lora_parts(module) is not None
            if not hasattr(module, "_glmtune_peft_forward"):
                _patch(module, _fused_linear_forward)
        elif _is_silu_gated_mlp(module):
            counts["mlp"] += 1
            if not hasattr(module, "_glmtune_peft_forward"):
                _patch(module, _fused_mlp_forward)
    return counts


def unfuse_lora(model) -> None:
    for module in model.modules():
        if hasattr(module, "_glmtune_peft_forward"):
            del module.forward
            del module._glmtune_peft_forward
