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

Autograd through those ops would keep five tensors per routed row (the gathered input, gate/up, SiLU(gate),
the gated product, the down output: 80 KB per token per GLM-4.7-Flash layer), and the activations then
decide how many tokens a CUDA-graphed row can hold. So SiLU-gated experts run one hand-written autograd
Function, `ExpertsLoraFunction`, that keeps the gate/up output only and recomputes or re-gathers the rest
in backward (the same GEMMs, tested equal to a loop over experts and to PEFT's forward); other gates run
the ops above through autograd.

Falls back to PEFT's forward, per call, for what it does not cover: merged or disabled adapters,
several active adapters, biased or non-gated experts, expert-parallel sharding.
"""
from __future__ import annotations

import types

import torch

from glmtune.models.fused_lora import is_silu, swiglu, swiglu_backward

__all__ = ["ExpertsLoraFunction", "expert_factors", "experts_lora_forward", "fuse_expert_lora", "grouped_mm",
           "grouped_wgrad", "unfuse_expert_lora"]


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


def _lora_weights(wrapper):
    """(lora_A (E*r, in), lora_B (out, r*E), scaling) of a ParamWrapper's one active adapter, as PEFT
    keeps them (lora_A's rows expert-major, lora_B's columns with the expert index fastest)."""
    name = wrapper.active_adapters[0]
    return wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, float(wrapper.scaling[name])


def expert_factors(lora_a, lora_b, experts: int, dtype):
    """PEFT's layout -> (A^T (E, in, r), B^T (E, r, out)) for the grouped GEMMs, in ``dtype`` (the
    weight's, as PEFT's own fold casts them). Copies: callers that keep them for backward should not
    (17.6 MB per GLM-4.7-Flash layer at r16; ExpertsLoraFunction rebuilds them instead)."""
    a3 = lora_a.reshape(experts, -1, lora_a.shape[-1])                     # (E, r, in)
    b3 = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)     # (E, out, r)
    return a3.transpose(1, 2).to(dtype).contiguous(), b3.transpose(1, 2).to(dtype).contiguous()


def _peft_grads(grad_a_t, grad_b_t, lora_a, lora_b):
    """Gradients in expert_factors' layout -> PEFT's (the inverse of its reshapes)."""
    grad_a = None if grad_a_t is None else grad_a_t.transpose(1, 2).reshape(lora_a.shape).to(lora_a.dtype)
    grad_b = None if grad_b_t is None else grad_b_t.permute(2, 1, 0).reshape(lora_b.shape).to(lora_b.dtype)
    return grad_a, grad_b


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


def _project(x, w, offs, lora):
    """Grouped x @ W_e (+ the LoRA term) for rows sorted by expert; w (E, in, out)."""
    y = grouped_mm(x, w, offs)
    if lora is not None:
        a_t, b_t, s = lora
        y = y + s * grouped_mm(grouped_mm(x, a_t, offs), b_t, offs)
    return y


def experts_lora_forward(experts, hidden_states, top_k_index, top_k_weights, loras: dict):
    """The routed experts' output with LoRA on their fused weights. hidden_states (T, hidden),
    top_k_index / top_k_weights (T, K); ``loras``: {"gate_up_proj" | "down_proj": (lora_A, lora_B, s)}
    in PEFT's layout (:func:`_lora_weights`).
    SiLU-gated experts (GLM's) run :class:`ExpertsLoraFunction`; other gates the same maths through
    autograd."""
    weight_dtype = experts.gate_up_proj.dtype
    transposed = getattr(experts, "is_transposed", False)
    w_gu, w_d = experts.gate_up_proj, experts.down_proj
    if not transposed:
        w_gu, w_d = w_gu.transpose(1, 2), w_d.transpose(1, 2)                 # (E, in, out) views
    if is_silu(getattr(experts, "act_fn", None)) and hidden_states.dtype == weight_dtype:
        gu, d = loras.get("gate_up_proj"), loras.get("down_proj")
        return ExpertsLoraFunction.apply(
            hidden_states, top_k_index, top_k_weights, w_gu, w_d,
            *(gu[:2] if gu else (None, None)), *(d[:2] if d else (None, None)),
            gu[2] if gu else 0.0, d[2] if d else 0.0)
    e = experts.num_experts
    loras = {name: (*expert_factors(a, b, e, weight_dtype), sc) for name, (a, b, sc) in loras.items()}
    tokens, k = top_k_index.shape
    perm, offs = _route(top_k_index, experts.num_experts)
    x = hidden_states[perm // k].to(weight_dtype)                                          # (S, hidden)
    h = _project(x, w_gu, offs, loras.get("gate_up_proj"))                                 # (S, 2I)
    h = _gate(experts, h)                                                                 # (S, I)
    y = _project(h, w_d, offs, loras.get("down_proj"))                                     # (S, hidden)
    return _combine(y, top_k_weights.reshape(-1)[perm], perm, tokens, k).to(hidden_states.dtype)


def _route(top_k_index, num_experts: int):
    """(perm, offs): the (token, slot) pairs sorted by expert, and the experts' cumulative row counts."""
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    # histc, not bincount: its output size does not depend on the data (no host sync, graph-safe);
    # CPU histc takes floats only
    ids = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)
    return perm, torch.cumsum(counts, 0, dtype=torch.int32)


def _combine(y, weights, perm, tokens: int, k: int):
    """Rows (S, hidden) in expert order, times their routing weights, summed per token -> (T, hidden).
    The fp32 routing weights promote the product to fp32: a token's K slots are summed in fp32
    (deterministically, no atomics), as transformers' grouped forward does."""
    y = y * weights.unsqueeze(-1)
    out = torch.empty_like(y)
    out[perm] = y                                            # back to (token, slot) order
    return out.view(tokens, k, -1).sum(1)


def _gate(experts, h):
    """The experts' gating on the concatenated [gate; up] rows (transformers' default: SwiGLU)."""
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def grouped_wgrad(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group x_g^T g_g: x (S, K), g (S, N) sorted by group -> (G, K, N) (zeros for an empty group);
    what autograd computes for grouped_mm's weight operand."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    xt = x.t()
    if fn is not None and _kernel_ok(xt, g):
        return fn(xt, g, offs=offs)
    out, start = x.new_zeros(offs.numel(), x.shape[1], g.shape[1]), 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[e] = xt[:, start:end] @ g[start:end]
        start = end
    return out


class ExpertsLoraFunction(torch.autograd.Function):
    """SiLU-gated routed experts with LoRA, saving what backward cannot cheaply recompute.

    Autograd through the composed ops keeps, per (token, expert) row, the gathered input (hidden),
    the gate/up output (2I), SiLU(gate) (I), the gated product (I) and the down output (hidden):
    for GLM-4.7-Flash 80 KB per token per layer (bench/moe_saved_bytes.py). This keeps the gate/up
    output only, plus the rank-r LoRA inputs: the input is gathered again from ``hidden_states`` (kept
    by the shared experts anyway), the gated product is recomputed from gate/up (elementwise), and
    the routing weights' gradient is read off the down projection's input gradient
    (``<y_s, g> = <a_s, g W^T>``), so the down output is never kept. Equal to the composed path
    (tests/models/test_expert_lora.py: fp32, against PEFT's forward, losses and every gradient)."""

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, w_gu, w_d, lora_a_gu, lora_b_gu, lora_a_d, lora_b_d,
                s_gu: float, s_d: float):
        tokens, k = top_k_index.shape
        a_gu, b_gu, a_d, b_d = _layouts(w_gu, lora_a_gu, lora_b_gu, lora_a_d, lora_b_d)
        perm, offs = _route(top_k_index, w_gu.shape[0])
        rows = perm // k
        x = hidden[rows]                                                               # (S, hidden)
        h = grouped_mm(x, w_gu, offs)
        xa = None
        if a_gu is not None:
            xa = grouped_mm(x, a_gu, offs)
            h = h + s_gu * grouped_mm(xa, b_gu, offs)
        del x
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
        y = grouped_mm(a, w_d, offs)
        aa = None
        if a_d is not None:
            aa = grouped_mm(a, a_d, offs)
            y = y + s_d * grouped_mm(aa, b_d, offs)
        weights = top_k_weights.reshape(-1)[perm]
        del a_gu, b_gu, a_d, b_d  # rebuilt in backward (cheap copies), not kept through the step
        ctx.save_for_backward(hidden, perm, offs, weights, h, xa, aa, w_gu, w_d, lora_a_gu, lora_b_gu, lora_a_d,
                              lora_b_d)
        ctx.k, ctx.s_gu, ctx.s_d = k, s_gu, s_d
        return _combine(y, weights, perm, tokens, k).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, perm, offs, weights, h, xa, aa, w_gu, w_d, lora_a_gu, lora_b_gu, lora_a_d, lora_b_d = \
            ctx.saved_tensors
        a_gu, b_gu, a_d, b_d = _layouts(w_gu, lora_a_gu, lora_b_gu, lora_a_d, lora_b_d)
        k, s_gu, s_d = ctx.k, ctx.s_gu, ctx.s_d
        need = ctx.needs_input_grad
        rows = perm // k
        g = grad_out[rows].to(h.dtype)                         # each row's output gradient (unweighted)
        gate, up = h.chunk(2, dim=-1)
        a = swiglu(gate, up)                                   # recomputed, not kept
        ga = grouped_mm(g, w_d.transpose(1, 2), offs)          # d<g, y>/da, before the routing weight
        grad_a_d = grad_b_d = None
        if a_d is not None:
            gb = grouped_mm(g, b_d.transpose(1, 2), offs)      # (S, r)
            ga = ga + s_d * grouped_mm(gb, a_d.transpose(1, 2), offs)
            if need[7]:
                grad_a_d = grouped_wgrad(a, (gb * (s_d * weights).unsqueeze(-1)).to(a.dtype), offs)
            if need[8]:
                grad_b_d = grouped_wgrad((aa * (s_d * weights).unsqueeze(-1)).to(aa.dtype), g, offs)
        grad_weights = None
        if need[2]:
            dw = (a.float() * ga.float()).sum(-1)             # <a_s, g W^T> = <y_s, g>
            grad_weights = torch.empty_like(dw)
            grad_weights[perm] = dw
            grad_weights = grad_weights.view(-1, k)
        del a
        grad_gate, grad_up = swiglu_backward((ga * weights.unsqueeze(-1)).to(ga.dtype), gate, up)
        del ga, g
        grad_h = torch.cat([grad_gate, grad_up], dim=-1)
        del grad_gate, grad_up
        grad_a_gu = grad_b_gu = grad_hidden = None
        gb = None
        if a_gu is not None:
            gb = grouped_mm(grad_h, b_gu.transpose(1, 2), offs)  # (S, r)
            if need[6]:
                grad_b_gu = grouped_wgrad((xa * s_gu).to(xa.dtype), grad_h, offs)
            if need[5]:
                grad_a_gu = grouped_wgrad(hidden[rows], (gb * s_gu).to(gb.dtype), offs)
        if need[0]:
            gx = grouped_mm(grad_h, w_gu.transpose(1, 2), offs)
            if gb is not None:
                gx = gx + s_gu * grouped_mm(gb, a_gu.transpose(1, 2), offs)
            # back to (token, slot) order and summed over a token's K slots: no atomics
            unsorted = torch.empty_like(gx)
            unsorted[perm] = gx
            grad_hidden = unsorted.view(-1, k, gx.shape[-1]).sum(1, dtype=torch.float32).to(hidden.dtype)
        grad_a_gu, grad_b_gu = _peft_grads(grad_a_gu, grad_b_gu, lora_a_gu, lora_b_gu)
        grad_a_d, grad_b_d = _peft_grads(grad_a_d, grad_b_d, lora_a_d, lora_b_d)
        return grad_hidden, None, grad_weights, None, None, grad_a_gu, grad_b_gu, grad_a_d, grad_b_d, None, None


def _layouts(w_gu, lora_a_gu, lora_b_gu, lora_a_d, lora_b_d):
    """Both projections' factors in the grouped GEMMs' layout and the weight's dtype (None: no LoRA)."""
    e, dtype = w_gu.shape[0], w_gu.dtype
    gu = expert_factors(lora_a_gu, lora_b_gu, e, dtype) if lora_a_gu is not None else (None, None)
    d = expert_factors(lora_a_d, lora_b_d, e, dtype) if lora_a_d is not None else (None, None)
    return (*gu, *d)


def _fused_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    wrappers, experts = _chain(self)
    if args or kwargs or not _supported(experts) or not all(_usable(w) for w in wrappers.values()):
        return self._glmtune_peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    loras = {name: _lora_weights(w) for name, w in wrappers.items()}
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
