"""Linear + cross-entropy over token chunks sized for the GEMM, for a frozen LM head (LoRA / QLoRA).

Why the chunk size matters: liger-kernel's fused linear cross-entropy by default sizes its chunks so a
chunk's logits take about as much memory as the hidden states (chunk = next_pow2(tokens / ceil(vocab /
hidden))). For GLM-4 (vocabulary 151,552, hidden 4,096) and the 1,536-token rows of CUDA-graphed
training that is 64 tokens: 48 GEMMs with M = 64 per row, each reading the whole 1.24 GB LM head, so
the loss took 21.7 ms of a 151 ms row on the H100 (bench/RESULTS.md, session 3) for ~6 ms of
arithmetic. Chunks of `chunk_tokens` (256 by default: ~80 MB of bf16 logits) make the GEMMs
compute-bound again.

On CUDA with liger-kernel this asks liger for that chunk size (its `chunk_mem_const` budget) and keeps
its one-pass Triton cross-entropy kernel; elsewhere (CPU, no liger) the same chunking in torch ops.
Either way the gradient w.r.t. the hidden states is computed in the forward pass chunk by chunk (the
logits are never kept), so backward is a scale of a stored (tokens x hidden) tensor.
"""
from __future__ import annotations

import functools

import torch

from glmtune.templates import IGNORE_INDEX


def _chunk_loss_and_grad(h, weight, bias, targets):
    """Summed loss over valid targets of one chunk and d(loss)/dh (same dtype as h)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    z = logits.float()
    del logits
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, safe[:, None]).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    # softmax - one_hot, in place over the fp32 logits; rows of ignored targets contribute nothing
    z.sub_(lse[:, None]).exp_()
    z[torch.arange(z.shape[0], device=z.device), safe] -= 1.0
    z.mul_(valid[:, None])
    grad_h = z.to(h.dtype) @ weight
    return loss, grad_h


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid targets of CE(hidden @ weightᵀ + bias, targets); grads for hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if hidden.requires_grad else None
        for start in range(0, h.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            loss, g = _chunk_loss_and_grad(h[sl], weight, bias, t[sl])
            total += loss
            if grad is not None:
                grad[sl] = g
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = None if grad is None else (grad * grad_out.to(grad.dtype)).view(ctx.shape)
        return g, None, None, None, None


def liger_chunk_budget(tokens: int, hidden: int, vocab: int, chunk_tokens: int) -> int:
    """liger's `chunk_mem_const` that gives chunks of about `chunk_tokens` tokens (liger rounds the
    chunk to a power of two): its chunk is next_pow2(tokens / ceil(vocab / (const * hidden)))."""
    want_chunks = max(1, -(-tokens // chunk_tokens))
    return max(1, -(-vocab // (want_chunks * hidden)))


@functools.cache
def _liger_function():
    """liger's fused linear cross-entropy Function if it takes `chunk_mem_const`, else None (probed once)."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F
    except Exception:  # not installed, or triton missing
        return None
    import inspect

    params = inspect.signature(F.forward).parameters
    return F if "chunk_mem_const" in params else None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, *, chunk_tokens: int = 256,
                             use_liger: bool | None = None) -> torch.Tensor:
    """Summed next-token loss of `hidden` (N, H) against `targets` (N,) (IGNORE_INDEX skipped), the logits
    computed `chunk_tokens` rows at a time. The LM head must be frozen (LoRA, QLoRA, prefix).
    `use_liger` None: liger's kernel on CUDA when installed (with chunk-size control), else torch."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy_sum computes no gradient for a trainable LM head; "
                         "use the model's own loss when lm_head is trained")
    fn = _liger_function() if (use_liger is not False and hidden.is_cuda) else None
    if use_liger and fn is None:
        raise ValueError("liger-kernel with chunk_mem_const (>= 0.8.5) is needed for use_liger=True")
    if fn is None:
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_tokens))
    h = hidden.reshape(-1, hidden.shape[-1])
    const = liger_chunk_budget(h.shape[0], h.shape[1], weight.shape[0], int(chunk_tokens))
    out = fn.apply(h, weight, targets.reshape(-1), bias, None, IGNORE_INDEX, 0.0, 0.0, "sum", None, False, None, False,
                   False, False, None, None, const)
    return out[0] if isinstance(out, tuple) else out
