"""Packed DPO: a batch's pairs in packed rows, the prompt once per pair, logits only where they score.

TRL's DPOTrainer (DataCollatorForPreference) runs each pair as two padded rows, prompt + chosen and
prompt + rejected: the prompt twice, every row padded to the longest of the batch, and the reference
forward the same again. Here each pair is one segment of a packed row

    [ prompt[:-1] | prompt[-1]  chosen | prompt[-1]'  rejected ]      seg 0 | seg 1 | seg 2
      pos 0..P-2    P-1         P..     P-1          P..

where a token sees earlier tokens of its own pair that are in the shared prompt (seg 0) or in its own
branch (same seg). The last prompt token is written twice (once per branch, same position, same
context) so every position predicts exactly one answer token: that keeps TRL's fused LM head (labels
-> per-token log-probs, logits only at labelled positions) usable as it is. Each answer token therefore
sees exactly the tokens and positions it sees in TRL's padded row, so the per-token log-probs, and with
them TRL's loss and gradients, are the same (tests/align/test_packed.py checks both against TRL's
padded batch, fp32 on CPU).

Two ways to attend that way (`align.pack_attention`, decided by `decide_packing`):

- varlen (CUDA): FlashAttention's variable-length kernel, no mask at all. A pair is two attention
  segments: queries [seg 0 + seg 1] over the same keys (plain causal), and queries [seg 2] over the
  keys [seg 0 + seg 2]. The second one's keys are not contiguous in the row, so the kernel gets keys and
  values gathered by `pack_kv_index` (seg 0's keys/values twice: a copy of 2 KV heads on GLM-4, not of
  the hidden states; autograd sums their gradients back). FlashAttention aligns a segment with fewer
  queries than keys to its last key, so a rejected token sees all of seg 0 and the rejected branch up
  to itself: the block mask, without its rows x tokens^2 tensor and without SDPA falling off its
  flash kernel for a dense mask. All pairs of a batch go into one row. Without CUDA (tests) the same
  segments run through SDPA with the equivalent dense mask (`segment_attention_reference`).
- mask: SDPA/eager with a (rows, 1, T, T) block mask built on the device from per-token pair and
  segment ids; pairs are packed best-fit into rows of at most `row_tokens` tokens
  (train.data.pack_rows_best_fit), since the mask grows with the square of a row.

The packed rows are built on the host by the collator (`pack_pairs`, next to TRL's padded batch,
whose masks TRL's loss reads).

The reference log-probs come from the same packed forward with the adapter off (or TRL's "ref"
adapter, or TRL's ref_model), once per batch under no_grad, or once for the whole dataset before
training (TRL's precompute_ref_log_probs, through `compute_ref_log_probs`). TRL still computes the
loss (every loss_type), the metrics and the logging from them: only its forward passes are replaced.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Literal

import torch

from glmtune.templates import IGNORE_INDEX

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
PAIR_ATTENTION = "glmtune_pairs"    # the attention implementation of the varlen layout (transformers registry)
PAIR_KWARGS = ("pair_kv_index", "pair_cu_q", "pair_cu_k", "pair_max_q", "pair_max_k")


@dataclass(frozen=True)
class Packing:
    """How a DPO run packs its pairs (decide_packing): the attention layout, and for `mask` the row size."""
    layout: Literal["varlen", "mask"]
    row_tokens: int | None = None   # mask: most tokens per packed row; varlen: one row per batch


def pair_segments(prompt: list[int], chosen: list[int], rejected: list[int]):
    """One pair's packed segment: (ids, positions, segment ids, labels) lists, length P + C + R + 1."""
    p = len(prompt)
    ids = prompt + chosen + prompt[-1:] + rejected
    pos = list(range(p + len(chosen))) + list(range(p - 1, p + len(rejected)))
    seg = [PROMPT] * (p - 1) + [CHOSEN] * (len(chosen) + 1) + [REJECTED] * (len(rejected) + 1)
    labels = [IGNORE_INDEX] * p + chosen + [IGNORE_INDEX] + rejected
    return ids, pos, seg, labels


def varlen_pair_index(pairs: list[tuple[int, int, int]]) -> dict[str, torch.Tensor | int]:
    """(P, C, R) = (prompt, chosen, rejected) lengths of the pairs laid out one after another in a row
    (pair_segments) -> the varlen attention segments that attend like the block mask (PAIR_KWARGS).

    Per pair at row offset o, with P' = P - 1 shared prompt tokens, C' = C + 1 and R' = R + 1 branch tokens:
    queries [o, o + P' + C') attend causally to the same keys; queries [o + P' + C', o + P' + C' + R')
    attend to keys gathered from [o, o + P') and [o + P' + C', o + P' + C' + R'), causally aligned to
    the last key. `pair_kv_index` lists, for every gathered key, its index in the row."""
    kv, lens_q, lens_k, o = [], [], [], 0
    for p, c, r in pairs:
        core, chosen, rejected = p - 1, c + 1, r + 1
        kv += list(range(o, o + core + chosen)) + list(range(o, o + core))
        kv += list(range(o + core + chosen, o + core + chosen + rejected))
        lens_q += [core + chosen, rejected]
        lens_k += [core + chosen, core + rejected]
        o += core + chosen + rejected

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

    return {"pair_kv_index": torch.tensor(kv), "pair_cu_q": cumulative(lens_q), "pair_cu_k": cumulative(lens_k),
            "pair_max_q": max(lens_q), "pair_max_k": max(lens_k)}


def pack_pairs(examples: list[dict], *, max_length: int | None, row_tokens: int | None,
               layout: str = "mask") -> dict[str, torch.Tensor]:
    """Rows {prompt_ids, chosen_ids, rejected_ids} -> the packed batch (keys `pack_*`).

    Answers are cut as TRL's collator cuts them (prompt + answer to max_length, keep_start), so the
    padded batch TRL builds from the same rows, (2B, L) with chosen rows first, is what `pack_dst`
    indexes: pack_dst[i] is the flat index in TRL's (2B, L - 1) per-token layout of the answer token
    whose log-prob is at flat index pack_src[i] of the packed (rows, T - 1) layout.

    layout mask: rows of at most `row_tokens` tokens with per-token pair and segment ids (pack_pair,
    pack_seg) for `pair_mask`; varlen: every pair in one row, with the varlen segments
    (`varlen_pair_index`, keys pack_pair_*)."""
    from glmtune.train.data import pack_rows_best_fit

    n = len(examples)
    cut = (lambda p, a: a[: max(max_length - len(p), 0)]) if max_length else (lambda p, a: a)
    pairs = [(ex["prompt_ids"], cut(ex["prompt_ids"], ex["chosen_ids"]), cut(ex["prompt_ids"], ex["rejected_ids"]))
             for ex in examples]
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)   # L of TRL's padded batch
    lengths = [len(p) + len(c) + len(r) + 1 for p, c, r in pairs]
    if layout == "varlen":
        rows = [list(range(n))]
    else:
        rows = list(pack_rows_best_fit(lengths, max(row_tokens, max(lengths)), lookahead=n))
    T = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    seg = torch.full_like(ids, PAD)
    pair = -1 - torch.arange(len(rows) * T).view(len(rows), T)  # a pad token is its own "pair"
    src, dst = [], []
    for r, row in enumerate(rows):
        o = 0
        for b in row:
            p, c, rej = pairs[b]
            s_ids, s_pos, s_seg, s_lab = pair_segments(p, c, rej)
            k = len(s_ids)
            ids[r, o:o + k], pos[r, o:o + k] = torch.tensor(s_ids), torch.tensor(s_pos)
            seg[r, o:o + k], labels[r, o:o + k], pair[r, o:o + k] = torch.tensor(s_seg), torch.tensor(s_lab), b
            P = len(p)
            # the token at packed index t is predicted by the hidden state at t - 1 (TRL's shift)
            for j in range(len(c)):
                src.append(r * (T - 1) + o + P - 1 + j)
                dst.append(b * (width - 1) + P - 1 + j)
            for j in range(len(rej)):
                src.append(r * (T - 1) + o + P + len(c) + j)
                dst.append((n + b) * (width - 1) + P - 1 + j)
            o += k
    out = {"pack_input_ids": ids, "pack_position_ids": pos, "pack_labels": labels,
           "pack_src": torch.tensor(src), "pack_dst": torch.tensor(dst)}
    if layout == "varlen":
        out.update({f"pack_{k}": v for k, v in
                    varlen_pair_index([(len(p), len(c), len(r)) for p, c, r in pairs]).items()})
    else:
        out.update({"pack_pair": pair, "pack_seg": seg})
    return out


def pair_mask(pair: torch.Tensor, seg: torch.Tensor, *, boolean: bool, dtype=torch.float32) -> torch.Tensor:
    """(rows, T) pair and segment ids -> the (rows, 1, T, T) attention mask: query q sees key k when both
    are in one pair, k <= q, and k is in the shared prompt or in q's own branch. boolean: True = attend
    (sdpa); else additive (0 / dtype's min, eager)."""
    T = pair.shape[1]
    idx = torch.arange(T, device=pair.device)
    allowed = ((pair[:, :, None] == pair[:, None, :]) & (idx[None, :] <= idx[:, None])[None]
               & ((seg[:, None, :] == PROMPT) | (seg[:, None, :] == seg[:, :, None])))[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=pair.device).masked_fill_(~allowed, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------------
# the varlen layout's attention

def segment_attention_reference(q, k, v, cu_q, cu_k, *, scale: float | None = None) -> torch.Tensor:
    """What FlashAttention's causal varlen kernel computes, through SDPA with a dense mask (CPU, fp32):
    q (Tq, Hq, D), k/v (Tk, Hkv, D) -> (Tq, Hq, D). Query i of a segment with Lq queries and Lk keys sees
    its keys 0 .. i + Lk - Lq (causal, aligned to the last key)."""
    import torch.nn.functional as F

    lens_q, lens_k = cu_q.diff().long(), cu_k.diff().long()
    segs = torch.arange(len(lens_q), device=q.device)
    seg_q, seg_k = segs.repeat_interleave(lens_q), segs.repeat_interleave(lens_k)
    local_q = torch.arange(q.shape[0], device=q.device) - cu_q[:-1].long()[seg_q]
    local_k = torch.arange(k.shape[0], device=q.device) - cu_k[:-1].long()[seg_k]
    last = local_q + (lens_k - lens_q)[seg_q]               # the last key query i may see, in its segment
    allowed = (seg_q[:, None] == seg_k[None, :]) & (local_k[None, :] <= last[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=allowed[None, None], scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def pair_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers attention function of the varlen layout. With the PAIR_KWARGS (a packed DPO forward):
    query (1, Hq, T, D), key/value (1, Hkv, T, D) of one packed row -> (1, T, Hq, D), the keys and values
    gathered by pair_kv_index, FlashAttention varlen on CUDA in half precision, else
    `segment_attention_reference`. Without them (any other call: evaluation metrics, generation) it is
    SDPA, the implementation the model was loaded with."""
    if "pair_kv_index" not in kwargs:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from glmtune.models.speed import varlen_gqa_attention, varlen_support

    index, cu_q, cu_k = kwargs["pair_kv_index"], kwargs["pair_cu_q"], kwargs["pair_cu_k"]
    out_dtype = query.dtype
    q = query[0].transpose(0, 1)                              # (T, Hq, D)
    k = key[0].transpose(0, 1).index_select(0, index)         # (Tk, Hkv, D): the shared prompt's keys twice
    v = value[0].transpose(0, 1).index_select(0, index)
    if q.is_cuda and torch.is_autocast_enabled("cuda") and q.dtype not in (torch.float16, torch.bfloat16):
        # fp32 weights under autocast (full fine-tuning): FlashAttention runs in the autocast dtype, as SDPA would
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_support() is None:
        out = varlen_gqa_attention(q, k, v, cu_q, cu_k, kwargs["pair_max_q"], kwargs["pair_max_k"], scale=scaling)
    else:
        out = segment_attention_reference(q, k, v, cu_q, cu_k, scale=scaling)
    return out.unsqueeze(0).to(out_dtype), None


@functools.cache
def register_pair_attention() -> str:
    """Register PAIR_ATTENTION with transformers (once per process): the attention above, and SDPA's
    mask for the calls that are not packed forwards (a packed forward passes a 4D placeholder, which
    mask creation returns as it is, so no (T, T) mask is ever built for it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from glmtune.models.speed import register_varlen_attention, varlen_available

    if varlen_available():
        register_varlen_attention()  # for its probe: can this torch's kernel take GLM-4's 2 KV heads as they are
    AttentionInterface.register(PAIR_ATTENTION, pair_attention_forward)
    AttentionMaskInterface.register(PAIR_ATTENTION, sdpa_mask)
    return PAIR_ATTENTION


def use_pair_attention(model) -> None:
    """Switch `model` (PEFT-, DDP- or accelerate-wrapped, policy or TRL's ref_model) to PAIR_ATTENTION
    before its first packed forward, and leave it there: gradient checkpointing recomputes the blocks
    in backward, after any context around the forward would have ended, and the other calls (padded
    evaluation metrics, generation) are plain SDPA through it anyway. Done at the forward, not when the
    trainer is built, because TRL runs packed forwards inside its own __init__ (precomputed reference
    log-probs) and may load its ref_model there."""
    from glmtune.train.speed import set_attention

    base = model
    while hasattr(base, "module"):  # DDP / DeepSpeed engine
        base = base.module
    if getattr(base.config, "_attn_implementation", None) != PAIR_ATTENTION:
        set_attention(base, register_pair_attention())


# --------------------------------------------------------------------------------------------------
# the trainer

@dataclass
class PackedCollator:
    """TRL's DataCollatorForPreference batch (TRL's loss reads its masks) + the packed rows (keys pack_*)."""
    base: object                # trl DataCollatorForPreference
    packing: Packing

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.base(examples)
        batch.update(pack_pairs(examples, max_length=self.base.max_length, row_tokens=self.packing.row_tokens,
                                layout=self.packing.layout))
        return batch


def _model_inputs(pack: dict, boolean_mask: bool) -> dict:
    """The packed batch -> the model's keyword arguments: the block mask, or the varlen segments with a
    (1, 1, 1, 1) placeholder mask (transformers takes a 4D mask as it is; pair_attention_forward ignores it)."""
    kw = {"input_ids": pack["pack_input_ids"], "position_ids": pack["pack_position_ids"]}
    if "pack_pair_kv_index" in pack:
        kw["attention_mask"] = pack["pack_input_ids"].new_ones(1, 1, 1, 1, dtype=torch.bool)
        kw.update({k: pack[f"pack_{k}"] for k in PAIR_KWARGS})
    else:
        kw["attention_mask"] = pair_mask(pack["pack_pair"], pack["pack_seg"], boolean=boolean_mask)
    return kw


def packed_token_outputs(model, pack: dict, *, n_seqs: int, width: int, boolean_mask: bool):
    """One packed forward -> TRL's fused-head output with every per-token field laid out as TRL's padded
    (n_seqs, width - 1) batch (zeros where no answer token is scored)."""
    if "pack_pair_kv_index" in pack:
        use_pair_attention(model)
    out = model(**_model_inputs(pack, boolean_mask), labels=pack["pack_labels"], fused_lm_head=True, use_cache=False)
    src, dst = pack["pack_src"], pack["pack_dst"]

    def unpack(x):
        if x is None:
            return None
        flat = x.reshape(-1)[src]
        return flat.new_zeros(n_seqs * (width - 1)).index_put((dst,), flat).view(n_seqs, width - 1)

    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"):
        setattr(out, name, unpack(getattr(out, name, None)))
    return out


class _PackedPolicy:
    """Stands in for the policy inside TRL's `_compute_loss`: called with TRL's padded batch, it runs the
    packed rows instead and returns the per-token outputs in the padded layout."""

    def __init__(self, model, pack: dict, boolean_mask: bool):
        self.model, self.pack, self.boolean_mask = model, pack, boolean_mask

    def __call__(self, *, input_ids, fused_lm_head: bool = False, **_):
        if not fused_lm_head:
            raise NotImplementedError("packed DPO computes per-token log-probs only (TRL's fused LM head)")
        return packed_token_outputs(self.model, self.pack, n_seqs=input_ids.shape[0], width=input_ids.shape[1],
                                    boolean_mask=self.boolean_mask)


def packed_dpo_trainer(base):
    """`base` (glmtune's DPOTrainer) with packed forwards when built with `packing`; without it, base."""

    class GlmtunePackedDPOTrainer(base):
        def __init__(self, *args, packing: Packing | None = None, **kwargs):
            self.packing = packing
            if packing:
                from trl.trainer.dpo_trainer import DataCollatorForPreference
                targs = kwargs["args"]
                kwargs["data_collator"] = PackedCollator(
                    DataCollatorForPreference(pad_token_id=kwargs["processing_class"].pad_token_id,
                                              max_length=targs.max_length, truncation_mode=targs.truncation_mode),
                    packing=packing)
            super().__init__(*args, **kwargs)
            if packing and self.ld_alpha is not None:
                raise ValueError("packed DPO does not implement TRL's ld_alpha weighting")

        def _boolean_mask(self) -> bool:
            impl = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", "sdpa")
            return impl != "eager"

        def _reference(self):
            """The reference model as TRL finds it: its ref_model, or the policy with TRL's "ref" adapter /
            the adapters off."""
            from trl.trainer.utils import use_adapter
            if self.ref_model is not None:
                return self.ref_model, contextlib.nullcontext()
            unwrapped = self.accelerator.unwrap_model(self.model)
            return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

        def _reference_logps(self, pack: dict, n_seqs: int, width: int):
            from trl.models.utils import disable_gradient_checkpointing
            model, ctx = self._reference()
            with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  ctx, self.accelerator.autocast()):
                out = packed_token_outputs(model, pack, n_seqs=n_seqs, width=width, boolean_mask=self._boolean_mask())
            return out.log_probs.sum(dim=1).chunk(2, dim=0)

        def compute_ref_log_probs(self, model, inputs):
            if "pack_input_ids" not in inputs:
                return super().compute_ref_log_probs(model, inputs)
            return self._reference_logps(inputs, *inputs["input_ids"].shape)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "pack_input_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            pack = {k: inputs.pop(k) for k in [k for k in inputs if k.startswith("pack_")]}
            if self.precompute_ref_logps:
                return super().compute_loss(_PackedPolicy(model, pack, self._boolean_mask()), inputs,
                                            return_outputs, num_items_in_batch)
            # once per batch: the reference's packed forward, handed to TRL's loss as if precomputed
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self._reference_logps(
                pack, *inputs["input_ids"].shape)
            self.precompute_ref_logps = True
            try:
                return super().compute_loss(_PackedPolicy(model, pack, self._boolean_mask()), inputs,
                                            return_outputs, num_items_in_batch)
            finally:
                self.precompute_ref_logps = False

    return GlmtunePackedDPOTrainer


def decide_packing(cfg, model) -> tuple[Packing | None, str]:
    """align.packing / align.pack_attention for a loaded policy -> (the packing, or None; the reason).

    Packing needs a transformers-native model (it takes a custom mask / attention kwargs as they are).
    varlen needs FlashAttention's varlen kernel (CUDA, torch.nn.attention.varlen), half-precision
    compute (model.dtype bf16/fp16) and an sdpa model (the other calls fall back to SDPA), no attention
    dropout; mask needs sdpa or eager. auto: varlen where it can run, else mask."""
    from glmtune.errors import ConfigError
    from glmtune.models.speed import varlen_available
    from glmtune.train.loop import reads_packing_from_position_ids

    a = cfg.align
    impl = getattr(model.config, "_attn_implementation", None) or cfg.model.attn_implementation
    problem = None
    if not reads_packing_from_position_ids(model):
        problem = "the model runs its own (remote) code, which may not take a custom attention mask"
    elif impl not in ("sdpa", "eager"):
        problem = f"model.attn_implementation {impl} takes no block mask (use sdpa or eager)"
    if a.packing is True and problem:
        raise ConfigError(f"align.packing: {problem}", field="align.packing", fix="set align.packing: auto or false")
    if a.packing is False or problem:
        return None, f"dpo: padded pairs (TRL's collator): {problem or 'align.packing is false'}"

    no_varlen = None
    if not varlen_available():
        no_varlen = "no CUDA FlashAttention varlen kernel here"
    elif cfg.model.dtype == "fp32":
        no_varlen = "model.dtype fp32 (FlashAttention computes in bf16/fp16)"
    elif impl != "sdpa":
        no_varlen = f"model.attn_implementation {impl} (varlen falls back to sdpa outside packed forwards)"
    elif getattr(model.config, "attention_dropout", 0.0):
        no_varlen = "the model has attention dropout"
    if a.pack_attention == "varlen" and no_varlen:
        raise ConfigError(f"align.pack_attention varlen: {no_varlen}", field="align.pack_attention",
                          fix="set align.pack_attention: auto or mask")
    if a.pack_attention == "varlen" or (a.pack_attention == "auto" and not no_varlen):
        return Packing("varlen"), ("dpo: packed pairs (prompt once per pair, FlashAttention varlen with the prompt's "
                                   "keys shared by both answers, one row per batch)")
    tokens = a.pack_tokens or 4 * cfg.data.cutoff_len
    why = f"; pack_attention auto -> mask: {no_varlen}" if a.pack_attention == "auto" else ""
    return Packing("mask", tokens), (f"dpo: packed pairs (prompt once per pair, block mask, rows of <= {tokens} "
                                     f"tokens{why})")
