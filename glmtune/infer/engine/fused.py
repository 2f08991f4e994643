"""Sibling projections of one input as one GEMM: an attention layer's q/k/v (and a gated MLP's
gate/up) computed by a single matmul over their stacked weights, for models the engine serves.

Why: at one decode row a GEMM costs its weight read plus a fixed launch-and-reduce overhead. On the
H200 (bench/RESULTS.md, session 12) GLM-4-9B's k_proj and v_proj (2 MB each) took 4.5 µs apiece
plus a split-K reduce each, ~12 µs a layer, ~0.5 ms of a 5.8 ms step, while q_proj read its 32 MB at
3 TB/s. One (q+k+v) x hidden GEMM reads the same bytes at q's rate. vLLM and SGLang build their
models with fused ``qkv_proj`` / ``gate_up_proj`` layers for this reason; we keep transformers'
modelling code and swap the modules under it instead.

How, without touching the modelling code: the first projection of a group (``q_proj``) becomes a
:class:`FusedProjection` that runs the stacked GEMM, returns its own columns and keeps the whole
output with the input it came from; the others (``k_proj``, ``v_proj``) become :class:`ProjectionPart`
modules that return their columns of it when called on that same input tensor (the modelling code
calls ``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)`` in a row), and compute their own slice otherwise, so
any calling order is still correct. The last part lets go of the kept output. The old weights are
freed: the stacked weight replaces them, so memory is unchanged. Traceable by ``torch.compile`` with
``fullgraph`` (the kept output is a side effect dynamo replays) and capturable in CUDA graphs.

Only plain ``nn.Linear`` siblings with one input width, dtype and device, no hooks, are fused (a
PEFT or 4-bit layer is left alone). The model is then for inference: its state dict names change.
"""
from __future__ import annotations

import functools

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Kept:
    """The fused output of a group's last call and the input it was computed from."""
    __slots__ = ("x", "out")

    def __init__(self):
        self.x = self.out = None


@functools.lru_cache(maxsize=None)
def _module_classes():
    import torch
    import torch.nn.functional as F

    class FusedProjection(torch.nn.Module):
        """The group's first projection: one GEMM over every sibling's stacked rows."""

        def __init__(self, weight, bias, width: int, kept: _Kept):
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
            self.width, self.kept = width, kept
            self.in_features, self.out_features = weight.shape[1], width

        def forward(self, x):
            out = F.linear(x, self.weight, self.bias)
            self.kept.x, self.kept.out = x, out
            return out[..., : self.width]

    class ProjectionPart(torch.nn.Module):
        """A later sibling: its rows [lo, hi) of the fused output (or its own GEMM on another input)."""

        def __init__(self, fused, lo: int, hi: int, last: bool):
            super().__init__()
            self._fused = [fused]  # a list: not a child module, so its weight is not registered twice
            self.lo, self.hi, self.last = lo, hi, last
            self.in_features, self.out_features = fused.in_features, hi - lo

        @property
        def weight(self):  # a view of the fused rows (what adapters read: dtype, device, shape)
            return self._fused[0].weight[self.lo: self.hi]

        def forward(self, x):
            fused = self._fused[0]
            kept = fused.kept
            if kept.x is x:
                out = kept.out[..., self.lo: self.hi]
                if self.last:
                    kept.x = kept.out = None
                return out
            bias = None if fused.bias is None else fused.bias[self.lo: self.hi]
            return F.linear(x, self.weight, bias)

    return FusedProjection, ProjectionPart


def _fusable(linears) -> bool:
    import torch

    first = linears[0]
    for m in linears:
        if type(m) is not torch.nn.Linear or m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return False
        if (m.in_features, m.weight.dtype, m.weight.device) != (first.in_features, first.weight.dtype,
                                                                first.weight.device):
            return False
        if (m.bias is None) != (first.bias is None):
            return False
    return True


def fuse_projections(model, groups=GROUPS) -> int:
    """Replace each fusable group of sibling projections in ``model`` (see the module docstring);
    returns how many groups were fused. Call before adapters' hooks are attached to the layers."""
    import torch

    FusedProjection, ProjectionPart = _module_classes()
    fused_count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for names in groups:
                linears = [getattr(parent, n, None) for n in names]
                if any(m is None for m in linears) or not _fusable(linears):
                    continue
                weight = torch.cat([m.weight for m in linears])
                bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
                sizes = [m.out_features for m in linears]
                fused = FusedProjection(weight, bias, sizes[0], _Kept())
                setattr(parent, names[0], fused)
                lo = sizes[0]
                for i, (name, size) in enumerate(zip(names[1:], sizes[1:])):
                    setattr(parent, name, ProjectionPart(fused, lo, lo + size, last=i == len(sizes) - 2))
                    lo += size
                fused_count += 1
    return fused_count


def fused_groups(model) -> int:
    """How many fused projection groups ``model`` has."""
    FusedProjection, _ = _module_classes()
    return sum(isinstance(m, FusedProjection) for m in model.modules())
