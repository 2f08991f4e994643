"""Grouped-GEMM LoRA for fused routed experts (the `speed.expert_lora` lever).

PEFT puts LoRA on a 3-D expert parameter with ``lora.ParamWrapper`` (glmtune.models.moe says why that
is the adapter we save): on every forward it parametrises ``W' = W + s B A`` — a full copy of all E
experts' weights per layer — and the experts' grouped GEMM then differentiates through ``W'``, so the
backward computes a full ``(E, out, in)`` weight gradient only to reduce it to the rank-r factors.
For GLM-4.7-Flash that is 64 x 9.4 M values per layer, twice, per micro-batch.

Here the same factors run beside the frozen weight instead, per routed (token, expert) pair, sorted
by expert (S = tokens x top-k rows):

    h  = gmm(x, W_gu) + s_gu * gmm(gmm(x, A_gu), B_gu)          (S, 2I)   gmm = grouped GEMM over experts
    a  = act(h_gate) * h_up                                      (S, I)
    y  = gmm(a, W_d) + s_d * gmm(gmm(a, A_d), B_d)               (S, hidden), weighted, summed per token

Four small rank-r grouped GEMMs next to the two large ones, and the backward computes only input
gradients through W plus the factors' gradients: about half the routed-expert FLOPs of PEFT's path
and no full-size temporary. The factors are cast to the weight's dtype, as PEFT's own fold does,
so the result is PEFT's up to summation order (tests/models/test_expert_lora.py: fp32, 1e-5).

Grouped GEMMs: ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) where the tensors meet
its 16-byte stride alignment, else a loop over the experts that received tokens (CPU tests with odd
shapes; never the CUDA path for bf16 models with hidden sizes and ranks that are multiples of 8).

Falls back to PEFT's forward, per call, for what it does not cover: merged or disabled adapters,
several active adapters, biased or non-gated experts, expert-parallel sharding.
"""
from __future__ import annotations

import types

import torch

__all__ = ["grouped_mm", "experts_lora_forward", "fuse_expert_lora", "unfuse_expert_lora"]


def _aligned(t: torch.Tensor) -> bool:
    """The grouped kernels' 16-byte rule for every non-unit stride (and, on a CPU, the data pointer:
    CUDA allocations are aligned, and a pointer cannot be read while torch.compile traces)."""
    size = t.element_size()
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return False
    return all((s * size) % 16 == 0 for s in t.stride() if s != 1)


def _kernel_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.dtype != w.dtype or not (_aligned(x) and _aligned(w)):
        return False
    if torch.compiler.is_compiling() and w.dtype != torch.bfloat16:
        return False  # inductor lowers grouped_mm for bf16 only
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (S, K) sorted by group, w (G, K, N), offs (G,) int32 cumulative row counts -> (S, N)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is not None and _kernel_ok(x, w):
        return fn(x, w, offs=offs)
    out, start = [], 0
    for g, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[g])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


def _factors(wrapper, dtype):
    """(A^T (E, in, r), B^T (E, r, out), scaling) of a ParamWrapper's one active adapter, in PEFT's
    layout (lora_A: (E*r, in) expert-major rows; lora_B: (out, r*E) with the expert index fastest)."""
    name = wrapper.active_adapters[0]
    a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
    e = wrapper.num_experts
    a3 = a.reshape(e, -1, a.shape[-1])                   # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)   # (E, out, r)
    return a3.transpose(1, 2).to(dtype).contiguous(), b3.transpose(1, 2).to(dtype).contiguous(), \
        float(wrapper.scaling[name])


def _usable(wrapper) -> bool:
    if wrapper.disable_adapters or wrapper.merged or len(wrapper.active_adapters) != 1:
        return False
    name = wrapper.active_adapters[0]
    return name in wrapper.lora_A and name not in getattr(wrapper, "lora_variant", {}) and \
        not wrapper.lora_bias.get(name, False)


def _chain(module):
    """The nested ParamWrappers of one experts module -> ({parameter name: wrapper}, the experts module)."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {}
    while isinstance(module, ParamWrapper):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return wrappers, module


def _supported(experts) -> bool:
    return (getattr(experts, "has_gate", True) and getattr(experts, "is_concatenated", True)
            and not getattr(experts, "has_bias", False)
            and not getattr(experts, "_is_expert_parallel", False)
            and not getattr(experts, "has_post_expert_norm", False)
            and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"))


def _project(x, weight, transposed: bool, offs, lora):
    """Grouped x @ W_e^T (+ the LoRA term) for rows sorted by expert."""
    w = weight if transposed else weight.transpose(1, 2)   # (E, in, out)
    y = grouped_mm(x, w, offs)
    if lora is not None:
        a_t, b_t, s = lora
        y = y + s * grouped_mm(grouped_mm(x, a_t, offs), b_t, offs)
    return y


def experts_lora_forward(experts, hidden_states, top_k_index, top_k_weights, loras: dict):
    """The routed experts' output with LoRA on their fused weights. hidden_states (T, hidden),
    top_k_index / top_k_weights (T, K); ``loras``: {"gate_up_proj" | "down_proj": (A^T, B^T, s)}."""
    weight_dtype = experts.gate_up_proj.dtype
    tokens, k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    x = hidden_states[perm // k].to(weight_dtype)                                          # (S, hidden)
    # histc, not bincount: its output size does not depend on the data (no host sync, graph-safe);
    # CPU histc takes floats only
    ids = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(ids, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    transposed = getattr(experts, "is_transposed", False)
    h = _project(x, experts.gate_up_proj, transposed, offs, loras.get("gate_up_proj"))      # (S, 2I)
    h = _gate(experts, h)                                                                 # (S, I)
    y = _project(h, experts.down_proj, transposed, offs, loras.get("down_proj"))            # (S, hidden)
    # the fp32 routing weights promote the product to fp32: the K slots of a token are summed in
    # fp32 (deterministically, no atomics), as transformers' grouped forward does
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    out = torch.empty_like(y)
    out[perm] = y                                            # back to (token, slot) order
    return out.view(tokens, k, -1).sum(1).to(hidden_states.dtype)


def _gate(experts, h):
    """SwiGLU on the concatenated [gate; up] rows (transformers' default experts gating)."""
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _fused_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    wrappers, experts = _chain(self)
    if args or kwargs or not _supported(experts) or not all(_usable(w) for w in wrappers.values()):
        return self._glmtune_peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    dtype = experts.gate_up_proj.dtype
    loras = {name: _factors(w, dtype) for name, w in wrappers.items()}
    return experts_lora_forward(experts, hidden_states, top_k_index, top_k_weights, loras)


def _is_expert_wrapper(module, parent) -> bool:
    """The outermost PEFT ParamWrapper of a fused-experts module."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    return isinstance(module, ParamWrapper) and not isinstance(parent, ParamWrapper) and \
        _supported(_chain(module)[1])


def fuse_expert_lora(model) -> int:
    """Route every LoRA-wrapped experts module through the grouped LoRA forward; returns how many.
    Idempotent; `unfuse_expert_lora` restores PEFT's forwards. Before torch.compile, as fuse_lora."""
    n = 0
    for parent in model.modules():
        for child in parent.children():
            if _is_expert_wrapper(child, parent):
                n += 1
                if not hasattr(child, "_glmtune_peft_forward"):
                    child._glmtune_peft_forward = child.forward
                    child.forward = types.MethodType(_fused_experts_forward, child)
    return n


def unfuse_expert_lora(model) -> None:
    for parent in model.modules():
        for child in parent.children():
            if _is_expert_wrapper(child, parent) and hasattr(child, "_glmtune_peft_forward"):
                del child.forward
                del child._glmtune_peft_forward
