"""Speed levers for training on CUDA (issue 6), each optional and each checked against the reference.

Profiling GLM-4-9B LoRA on an H100 (bench/RESULTS.md) showed the GPU idle half the time: the CPU
spends ~25 µs per op dispatch over ~15k ops per step, and cuDNN SDPA with a packed (block-diagonal)
mask rebuilds its graph on every call (~1.5-1.9 ms CPU each). So the levers are:
  * varlen FlashAttention (torch.nn.attention.varlen) for packed rows: no mask tensor at all;
  * regional torch.compile of the decoder layers: fewer, fused kernels -> far fewer dispatches;
  * liger-kernel's fused linear + cross-entropy: never materialise the (tokens x 151,552) logits.
"""
from __future__ import annotations

import functools
import inspect
import itertools
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


@functools.cache
def _varlen_call_options() -> dict:
    """torch's varlen_attn took `is_causal` in early releases and `window_size` later. Read once (the
    attention function asks on every call); callers copy before changing it."""
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

    if query.shape[0] != 1:
        raise ValueError("glmtune_varlen attention expects one packed row (batch size 1)")
    if "cu_seq_lens_q" not in kwargs:
        raise ValueError("glmtune_varlen attention needs the packed row's cu_seq_lens_q/max_length_q kwargs "
                         "(glmtune.train.data.pack_batch(..., varlen=True) adds them)")
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    out_dtype = query.dtype
    if query.dtype not in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(query.device.type):
        # FlashAttention runs in half precision only: fp32 q/k/v (fp32 master weights under autocast)
        # are cast to the autocast dtype, as autocast does for SDPA.
        half = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(half), key.to(half), value.to(half)
    out = varlen_gqa_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                               cu, cu, longest, longest, scale=scaling)
    return out.unsqueeze(0).to(out_dtype), None


def varlen_gqa_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, scale: float | None = None):
    """Causal FlashAttention over packed sequences: q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (Tq, Hq, D).

    Fewer K/V heads than query heads go to the kernel as they are where this torch can (an
    ``enable_gqa`` switch, or a kernel probed to share them), else they are expanded. Where a
    sequence has fewer queries than keys (a prompt chunk after cached positions), the causal mask is
    aligned to the last key, as FlashAttention does."""
    from torch.nn.attention.varlen import varlen_attn

    opts = dict(_varlen_call_options())
    has_gqa = opts.pop("_gqa")
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            opts["enable_gqa"] = True
        elif _KV_HEADS_SHARED:
            pass  # this torch's varlen_attn takes fewer KV heads as they are (probed at registration)
        else:  # expand the KV heads (GLM-4: 2 -> 32) when the kernel cannot share them
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **opts)


def padded_offsets(seq_lens: Sequence[int], tokens: int, max_segments: int) -> list[int]:
    """Cumulative offsets (max_segments + 1 entries) for a row of `tokens` tokens holding `seq_lens`:
    FlashAttention varlen boundaries of a fixed length (a CUDA graph's input, in training and prefill).

    The tail after the sequences (padding) is one more segment; entries after it repeat `tokens`."""
    used = sum(seq_lens)
    if used > tokens:
        raise ValueError(f"sequences of {used} tokens do not fit a row of {tokens}")
    n_segments = len(seq_lens) + (used < tokens)
    if n_segments > max_segments:
        raise ValueError(f"{n_segments} segments exceed max_segments={max_segments}")
    offsets = list(itertools.accumulate((int(n) for n in seq_lens), initial=0))
    if used < tokens:
        offsets.append(tokens)
    return offsets + [tokens] * (max_segments + 1 - len(offsets))


def varlen_support() -> str | None:
    """None when this torch has the varlen FlashAttention kernel (torch.nn.attention.varlen); else why not."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def varlen_available() -> bool:
    """True when the varlen kernel exists and there is a CUDA device to run it on."""
    import torch

    return varlen_support() is None and torch.cuda.is_available()


_KV_HEADS_SHARED = False


def probe_shared_kv_heads() -> bool:
    """Whether this torch's varlen_attn, lacking an `enable_gqa` switch (torch < 2.12), still runs
    grouped-query attention when given fewer K/V heads than query heads — FlashAttention's kernels
    do natively — with the same output and gradients as K/V expanded to every head.

    Expanding GLM-4's 2 K/V heads to 32 costs two (tokens x 4096) copies per layer, kept for the
    backward (~0.6 MB per token over 40 layers) and summed back in it."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    if not torch.cuda.is_available():
        return False
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(48, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(48, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(48, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    cu = torch.tensor([0, 20, 48], dtype=torch.int32, device="cuda")
    opts = {k_: v_ for k_, v_ in _varlen_call_options().items() if k_ != "_gqa"}
    try:
        out = varlen_attn(q, k, v, cu, cu, 28, 28, **opts)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    except Exception:  # the wrapper insists on equal head counts
        return False
    ref = varlen_attn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 28, 28, **opts)
    ref_grads = torch.autograd.grad(ref.float().sum(), (q, k, v))
    same = torch.allclose(out.float(), ref.float(), atol=2e-2)
    return same and all(torch.allclose(a.float(), b.float(), atol=5e-2) for a, b in zip(grads, ref_grads))


def register_varlen_attention() -> str:
    """Register `glmtune_varlen` with transformers (attention + 'no mask needed'); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    global _KV_HEADS_SHARED
    if not _varlen_call_options()["_gqa"]:
        _KV_HEADS_SHARED = probe_shared_kv_heads()

    AttentionInterface.register(VARLEN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPL, lambda *args, **kwargs: None)
    return VARLEN_IMPL


def liger_support(model_type: str) -> str | None:
    """None when liger-kernel can patch this model type here; else why not (one short phrase)."""
    try:
        import liger_kernel.transformers as lk
    except ImportError as e:
        return f"liger-kernel is not installed ({e.name or e})"
    except Exception as e:  # e.g. triton missing or broken on this machine
        return f"liger-kernel failed to import ({type(e).__name__}: {e})"
    if getattr(lk, f"apply_liger_kernel_to_{model_type}", None) is None:
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def apply_liger(model_type: str, *, fused_linear_cross_entropy: bool = True, rms_norm: bool = True,
                swiglu: bool = True) -> bool:
    """Patch transformers' classes with liger-kernel before the model is built. False if unavailable."""
    if liger_support(model_type) is not None:
        return False
    import liger_kernel.transformers as lk

    fn = getattr(lk, f"apply_liger_kernel_to_{model_type}")
    kwargs = dict(fused_linear_cross_entropy=fused_linear_cross_entropy, rms_norm=rms_norm, swiglu=swiglu)
    if "rope" in inspect.signature(fn).parameters:
        kwargs["rope"] = False  # liger has no GLM-4 partial RoPE; keep transformers' for all families
    fn(cross_entropy=False, **kwargs)
    return True


def liger_patch(model_type: str, **kwargs):
    """`apply_liger` that can be undone: returns a function restoring the patched transformers module
    (its module-level classes and its classes' forwards), or None when liger was not applied.

    liger patches classes process-wide; run_training undoes it when it ends, so a later model built
    in the same process (tests, a notebook) gets transformers' own modules again. Models built while
    the patch was on keep their liger modules.
    """
    import importlib

    try:
        mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        mod = None
    saved_globals = dict(vars(mod)) if mod else {}
    saved_methods = {}
    for obj in saved_globals.values():
        if isinstance(obj, type) and obj.__module__ == getattr(mod, "__name__", None):
            saved_methods[obj] = {k: v for k, v in vars(obj).items() if k in ("forward", "__init__")}
    if not apply_liger(model_type, **kwargs):
        return None

    def undo() -> None:
        if mod is None:
            return
        for k, v in saved_globals.items():
            if vars(mod).get(k) is not v:
                setattr(mod, k, v)
        for cls, methods in saved_methods.items():
            for k, v in methods.items():
                if vars(cls).get(k) is not v:
                    setattr(cls, k, v)
    return undo


def compile_decoder_layers(model, *, dynamic: bool = True) -> int:
    """Regional compilation: compile each block (all share one code object, so one compile serves
    every layer) instead of the whole model, which keeps compile time in seconds."""
    from glmtune.models.loading import find_decoder

    layers = find_decoder(model).layers
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Undo compile_decoder_layers (the eager modules were never replaced, so this is exact)."""
    from glmtune.models.loading import find_decoder

    for layer in find_decoder(model).layers:
        layer._compiled_call_impl = None
