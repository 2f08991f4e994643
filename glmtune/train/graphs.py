"""The decoder blocks as CUDA graphs, forward and backward, over packed rows of a fixed token count.

Why: profiling GLM-4-9B LoRA on an H100 (bench/RESULTS.md) showed the step bound by the CPU issuing
kernels (~0.3 s per forward + backward, with or without regional compile), so rows short enough to
fit the seed recipe's memory without checkpointing ran at half the GPU's pace. A CUDA graph replays a
whole forward (or backward) of the 40 blocks with one launch.

What makes a training row graphable: a fixed shape. Rows hold exactly `tokens` tokens (sequences
packed best-fit, the tail padded as one extra segment whose labels are ignored), and the varlen
attention reads its sequence boundaries from a fixed-length (`max_segments` + 1) offsets buffer
(unused entries repeat the last offset: empty segments). Embedding, final norm and loss stay eager
(the loss: glmtune.train.chunked_ce, logits computed chunk by chunk, never whole).

torch.cuda.make_graphed_callables captures the blocks once (after warm-up iterations, where
torch.compile, if on, compiles them); replays then copy each row's hidden states, cos and sin into
the graph's static inputs. Gradients of the LoRA weights come out of the backward graph and are
accumulated into `.grad` by autograd as usual, so gradient accumulation and any optimizer work.
Requirements (checked): CUDA, no dropout. Gradient checkpointing (non-reentrant) is captured too: the
recomputation is part of the backward graph.
"""
from __future__ import annotations

from typing import Sequence

import torch

from glmtune.models.speed import padded_offsets
from glmtune.templates import IGNORE_INDEX
from glmtune.train.data import token_loss_sum


def fixed_row(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None, tokens: int, pad_id: int):
    """(input_ids, labels, position_ids) lists of exactly `tokens`: the packed sequences, then padding.

    Each sequence's first label is ignored (after the shift it would be predicted from the previous
    sequence); padding has ignored labels and positions 0, 1, 2, ... like a sequence of its own."""
    ids, labs, pos = [], [], []
    for i, s in enumerate(seqs):
        lab = list(s) if labels is None else list(labels[i])
        ids.extend(s)
        labs.extend([IGNORE_INDEX] + lab[1:])
        pos.extend(range(len(s)))
    pad = tokens - len(ids)
    if pad < 0:
        raise ValueError(f"sequences of {len(ids)} tokens do not fit a row of {tokens}")
    return ids + [pad_id] * pad, labs + [IGNORE_INDEX] * pad, pos + list(range(pad))


def inner_model(model):
    """(causal LM, its decoder body with embed_tokens / layers / norm / rotary_emb) of a possibly
    PEFT-wrapped transformers-native causal LM."""
    from glmtune.models.loading import find_decoder

    dec = find_decoder(model)
    if not all(hasattr(dec.body, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        raise ValueError("graphed training needs a transformers decoder with embed_tokens/layers/norm/rotary_emb")
    return dec.lm, dec.body


class _DecoderStack(torch.nn.Module):
    """All decoder blocks as one module with tensor-only inputs (what a CUDA graph can take)."""

    def __init__(self, layers, offsets: torch.Tensor | None, tokens: int, mask: torch.Tensor | None):
        super().__init__()
        self.layers = layers
        self.offsets, self.tokens, self.mask = offsets, tokens, mask

    def forward(self, hidden, cos, sin):
        kw = {}
        if self.offsets is not None:
            kw = dict(cu_seq_lens_q=self.offsets, cu_seq_lens_k=self.offsets, max_length_q=self.tokens,
                      max_length_k=self.tokens)
        for layer in self.layers:
            out = layer(hidden, attention_mask=self.mask, position_ids=None, position_embeddings=(cos, sin), **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class GraphedDecoder:
    """Loss of packed fixed-size rows through the decoder blocks, replayed as CUDA graphs.

    `graph=False` runs the very same code eagerly (CPU tests, and the reference in the GPU tests).
    `varlen=False` (CPU) gives the blocks a block-causal mask instead of varlen offsets.
    """

    def __init__(self, model, *, tokens: int, max_segments: int = 64, graph: bool = True, varlen: bool = True,
                 loss_chunk: int = 256, warmup: int = 3, token_mask: torch.Tensor | None = None):
        self.model, self.inner = inner_model(model)
        self.tokens, self.max_segments, self.loss_chunk = tokens, max_segments, loss_chunk
        embed = self.inner.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        # (tokens,) bool, True for each row's real tokens: refilled before every forward, for readers
        # inside the blocks that must leave padding out (a MoE router's balance statistic); a caller's
        # buffer when the reader already holds it (it has to before capture), else one of its own
        self.token_mask = token_mask if token_mask is not None else \
            torch.ones(tokens, dtype=torch.bool, device=self.device)
        if self.token_mask.shape != (tokens,) or self.token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a ({tokens},) bool tensor, got {tuple(self.token_mask.shape)} "
                             f"{self.token_mask.dtype}")
        self.offsets = torch.zeros(max_segments + 1, dtype=torch.int32, device=self.device) if varlen else None
        self.mask = None if varlen else torch.zeros(1, 1, tokens, tokens, dtype=self.dtype, device=self.device)
        self.stack = _DecoderStack(self.inner.layers, self.offsets, tokens, self.mask)
        self.graphed = self.stack
        self._trainable = [p for p in self.stack.parameters() if p.requires_grad]
        self._grad_views = self._flat_grad_views()
        if graph:
            self._check_graphable()
            self.set_row([tokens])
            h = torch.zeros(1, tokens, self.inner.config.hidden_size, dtype=self.dtype, device=self.device)
            pos = torch.arange(tokens, device=self.device)[None]
            cos, sin = self.inner.rotary_emb(h, pos)
            self.graphed = torch.cuda.make_graphed_callables(self.stack, (h, cos, sin), num_warmup_iters=warmup)
            torch.cuda.empty_cache()  # the warm-up's eager activations: the graph has its own pool

    def _check_graphable(self) -> None:
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        for m in self.inner.modules():
            if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training:
                raise ValueError("CUDA-graphed blocks need dropout 0 (LoRA dropout / attention dropout)")

    def _flat_grad_views(self) -> list[torch.Tensor]:
        """One zeroable buffer per dtype holding every trainable block parameter's gradient."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self._trainable:
            by_dtype.setdefault(p.dtype, []).append(p)
        self._grad_buffers, views = [], {}
        for dtype, params in by_dtype.items():
            buf = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=self.device)
            self._grad_buffers.append(buf)
            offset = 0
            for p in params:
                views[id(p)] = buf[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
        return [views[id(p)] for p in self._trainable]

    def _ensure_grads(self) -> None:
        """Give every trainable parameter a gradient tensor of its own before the backward.

        A graphed backward hands autograd its static output buffers; a parameter without a `.grad`
        would adopt that buffer as its gradient, and the next row's replay would overwrite it (then
        add it to itself): accumulation over rows would be wrong. With a `.grad` in place autograd
        adds into it instead."""
        missing = [p for p in self._trainable if p.grad is None]
        if not missing:
            return
        if len(missing) == len(self._trainable):  # after optimizer.zero_grad(set_to_none=True)
            for buf in self._grad_buffers:
                buf.zero_()
            for p, view in zip(self._trainable, self._grad_views):
                p.grad = view
        else:
            for p in missing:
                p.grad = torch.zeros_like(p)

    def set_row(self, seq_lens: Sequence[int] | None = None, offsets: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> None:
        """Point the attention at this row's sequence boundaries (before its forward): the sequence
        lengths, or their padded_offsets and the (tokens,) real-token flags already on the device
        (device-to-device copies, no host wait)."""
        if offsets is None:
            offsets = torch.tensor(padded_offsets(seq_lens, self.tokens, self.max_segments), dtype=torch.int32)
            real = torch.arange(self.tokens) < sum(seq_lens)
        if real is not None:
            self.token_mask.copy_(real, non_blocking=True)
        if self.offsets is not None:
            self.offsets.copy_(offsets, non_blocking=True)
        else:
            from glmtune.train.data import block_causal_mask

            cuts = offsets.tolist()
            lens = [b - a for a, b in zip(cuts, cuts[1:]) if b > a]
            self.mask.copy_(block_causal_mask(lens, dtype=self.dtype).to(self.device))

    def all_reduce_grads(self) -> None:
        """Sum the trained parameters' gradients over processes (torch.distributed's group, as accelerate
        set it up). DDP's hooks only fire for a forward through the DDP wrapper, which the graphed blocks
        bypass; so one collective per flat gradient buffer, then any trained tensor outside it (a
        trained embedding or head; a block gradient that is not a view of the buffer)."""
        import torch.distributed as dist

        for buf in self._grad_buffers:
            dist.all_reduce(buf)
        for p, view in zip(self._trainable, self._grad_views):
            if p.grad is not None and p.grad is not view:
                dist.all_reduce(p.grad)
        in_stack = {id(p) for p in self._trainable}
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in in_stack and p.grad is not None:
                dist.all_reduce(p.grad)

    def loss_sum(self, input_ids, labels, position_ids, seq_lens: Sequence[int] | None = None, *,
                 offsets: torch.Tensor | None = None, real: torch.Tensor | None = None):
        """(sum of next-token losses, number of targets) for one fixed-size row (1, tokens); the row's
        sequences given by their lengths or by their padded offsets and real-token flags (on the device)."""
        if input_ids.shape != (1, self.tokens):
            raise ValueError(f"rows must be (1, {self.tokens}), got {tuple(input_ids.shape)}")
        self.set_row(seq_lens, offsets, real)
        self._ensure_grads()
        hidden = self.inner.embed_tokens(input_ids)
        cos, sin = self.inner.rotary_emb(hidden, position_ids)
        hidden = self.inner.norm(self.graphed(hidden, cos, sin))
        lm_head = self.model.lm_head
        bias = getattr(lm_head, "bias", None)
        frozen = not lm_head.weight.requires_grad and (bias is None or not bias.requires_grad)
        if not (frozen and self.loss_chunk):  # a trained LM head: plain logits + cross-entropy
            return token_loss_sum(lm_head(hidden), labels)
        from glmtune.train.chunked_ce import linear_cross_entropy_sum  # logits never materialised whole

        targets = labels[0, 1:]
        loss = linear_cross_entropy_sum(hidden[0, :-1], lm_head.weight, targets, bias, chunk_tokens=self.loss_chunk)
        return loss, (targets != IGNORE_INDEX).sum()
