"""Speed levers for training on CUDA (issue 6), each optional and each checked against the reference.

Profiling GLM-4-9B LoRA on an H100 (bench/RESULTS.md) showed the GPU idle half the time: the CPU
spends ~25 µs per op dispatch over ~15k ops per step, and cuDNN SDPA with a packed (block-diagonal)
mask rebuilds its graph on every call (~1.5-1.9 ms CPU each). So the levers are:
  * varlen FlashAttention (torch.nn.attention.varlen) for packed rows: no mask tensor at all;
  * regional torch.compile of the decoder layers: fewer, fused kernels -> far fewer dispatches;
  * liger-kernel's fused linear + cross-entropy: never materialise the (tokens x 151,552) logits.
"""
from __future__ import annotations

import inspect
from typing import Sequence

VARLEN_IMPL = "glmtune_varlen"


def cu_seqlens_kwargs(seq_lens: Sequence[int], device) -> dict:
    """FlashAttention-style kwargs for one packed row: cumulative offsets (N+1,) and the max length.

    transformers forwards these `**kwargs` from the model call down to the attention function.
    """
    import torch

    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + int(n))
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    longest = max(int(n) for n in seq_lens)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _varlen_call_options() -> dict:
    """torch's varlen_attn took `is_causal` in early releases and `window_size` later."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    opts = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    opts["_gqa"] = "enable_gqa" in params
    return opts


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function for packed rows. query (1, Hq, T, D), key/value (1, Hkv, T, D).

    Returns (1, T, Hq, D) like transformers' other attention functions.
    """
    import torch
    from torch.nn.attention.varlen import varlen_attn

    if query.shape[0] != 1:
        raise ValueError("glmtune_varlen attention expects one packed row (batch size 1)")
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    opts = dict(_varlen_call_options())
    has_gqa = opts.pop("_gqa")
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            opts["enable_gqa"] = True
        else:  # expand the KV heads (GLM-4: 2 -> 32) when the kernel cannot share them
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **opts)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Register `glmtune_varlen` with transformers (attention + 'no mask needed'); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPL, lambda *args, **kwargs: None)
    return VARLEN_IMPL


def apply_liger(model_type: str, *, fused_linear_cross_entropy: bool = True, rms_norm: bool = True,
                swiglu: bool = True) -> bool:
    """Patch transformers' classes with liger-kernel before the model is built. False if unavailable."""
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        return False
    fn = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        return False
    kwargs = dict(fused_linear_cross_entropy=fused_linear_cross_entropy, rms_norm=rms_norm, swiglu=swiglu)
    if "rope" in inspect.signature(fn).parameters:
        kwargs["rope"] = False  # liger has no GLM-4 partial RoPE; keep transformers' for all families
    fn(cross_entropy=False, **kwargs)
    return True


def decoder_layers(model):
    """The list of transformer blocks of a (possibly PEFT-wrapped) causal LM."""
    m = model
    for attr in ("base_model", "model"):
        while hasattr(m, attr) and not hasattr(m, "layers"):
            m = getattr(m, attr)
    if not hasattr(m, "layers"):
        raise ValueError("could not find the decoder layers of this model")
    return m.layers


def compile_decoder_layers(model, *, dynamic: bool = True) -> int:
    """Regional compilation: compile each block (all share one code object, so one compile serves
    every layer) instead of the whole model, which keeps compile time in seconds."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)
