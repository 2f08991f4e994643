"""RMSNorm that keeps its input, not an fp32 copy of it, for backward (the `speed.fused_norm` lever).

transformers' RMSNorm (Llama's form, which GLM-4, GLM-4.5+ and Qwen share) upcasts its input to
fp32 and autograd keeps that fp32 copy for the backward of ``x * rsqrt(mean(x^2) + eps)``: 8 bytes
per hidden value, twice per decoder layer, plus the MLA attention's q/kv norms. For GLM-4.7-Flash
that is 21 KB per token per layer of the ~120 KB a layer keeps (bench/moe_saved_bytes.py), where
neither torch.compile nor liger-kernel (which has no patch for glm4_moe_lite) fuses it.

:class:`RMSNormFunction` computes the same forward with the same ops (bit-identical output) and
keeps the input in its own dtype plus the fp32 reciprocal RMS per row; backward recomputes the
normalised values from them (elementwise, fp32). A norm module is switched only after a check on a
small random input that its own forward gives the same output (a variant such as Gemma's
``1 + weight`` fails the check and keeps its forward).
"""
from __future__ import annotations

import torch

__all__ = ["RMSNormFunction", "fuse_rms_norms", "is_fused", "unfuse_rms_norms"]


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)) with the statistics in fp32, as transformers computes it."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)
            grad_weight = grad_weight.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_y * weight).to(torch.float32)
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of the norm's class whose forward is RMSNormFunction. A class, not an instance
    ``forward``: transformers 5.2x with the ``kernels`` package installed re-kernelizes on every
    ``model.train()`` / ``eval()`` and, finding no hub kernel, pops instance forwards of its
    hub-decorated layers (RMSNorm among them) back to the class's."""
    if cls not in _FUSED_CLASSES:
        def forward(self, hidden_states):
            return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)

        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "glmtune_base_class": cls,
                                                          "__module__": cls.__module__})
    return _FUSED_CLASSES[cls]


def _candidate(module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and isinstance(getattr(module, "variance_epsilon", None), float) and module.weight.dim() == 1


def _same_forward(module) -> bool:
    """The module's own forward and the function agree on a random bf16 input (same ops: exactly)."""
    with torch.no_grad():
        x = torch.randn(3, module.weight.shape[0], generator=torch.Generator().manual_seed(0))
        x = x.to(device=module.weight.device, dtype=module.weight.dtype)
        return torch.equal(module.forward(x), RMSNormFunction.apply(x, module.weight, module.variance_epsilon))


def fuse_rms_norms(model) -> int:
    """Switch the model's RMSNorm modules to RMSNormFunction (their class becomes a subclass with that
    forward); returns how many. Idempotent; `unfuse_rms_norms` restores their classes. The check runs
    once per norm class."""
    checked: dict[type, bool] = {}
    n = 0
    for module in model.modules():
        if is_fused(module):
            n += 1
            continue
        if not _candidate(module):
            continue
        cls = type(module)
        if cls not in checked:
            checked[cls] = _same_forward(module)
        if checked[cls]:
            module.__class__ = _fused_class(cls)
            n += 1
    return n


def is_fused(module) -> bool:
    return "glmtune_base_class" in type(module).__dict__


def unfuse_rms_norms(model) -> None:
    for module in model.modules():
        if is_fused(module):
            module.__class__ = type(module).glmtune_base_class
