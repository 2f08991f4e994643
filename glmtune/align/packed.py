"""Packed DPO: a batch's pairs in packed rows, the prompt once per pair, logits only where they score.

TRL's DPOTrainer (DataCollatorForPreference) runs each pair as two padded rows, prompt + chosen and
prompt + rejected: the prompt twice, every row padded to the longest of the batch, and the reference
forward the same again. Here each pair is one segment of a packed row

    [ prompt[:-1] | prompt[-1]  chosen | prompt[-1]'  rejected ]      seg 0 | seg 1 | seg 2
      pos 0..P-2    P-1         P..     P-1          P..

with a block mask: a token sees earlier tokens of its own pair that are in the shared prompt (seg 0)
or in its own branch (same seg). The last prompt token is written twice (once per branch, same
position, same context) so every position predicts exactly one answer token: that keeps TRL's fused
LM head (labels -> per-token log-probs, logits only at labelled positions) usable as it is. Each
answer token therefore sees exactly the tokens and positions it sees in TRL's padded row, so the
per-token log-probs, and with them TRL's loss and gradients, are the same (tests/align/test_packed.py
checks both against TRL's padded batch, fp32 on CPU).

The packed rows are built on the host by the collator (`pack_pairs`, next to TRL's padded batch,
whose masks TRL's loss reads); the (rows, 1, T, T) mask is built on the device from per-token pair
and segment ids. Pairs are packed best-fit into rows of at most `row_tokens` tokens
(train.data.pack_rows_best_fit): the mask grows with the square of a row.

The reference log-probs come from the same packed forward with the adapter off (or TRL's "ref"
adapter, or TRL's ref_model), once per batch under no_grad, or once for the whole dataset before
training (TRL's precompute_ref_log_probs, through `compute_ref_log_probs`). TRL still computes the
loss (every loss_type), the metrics and the logging from them: only its forward passes are replaced.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from glmtune.templates import IGNORE_INDEX

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
PACK_KEYS = ("pack_input_ids", "pack_position_ids", "pack_labels", "pack_pair", "pack_seg", "pack_src", "pack_dst")


def pair_segments(prompt: list[int], chosen: list[int], rejected: list[int]):
    """One pair's packed segment: (ids, positions, segment ids, labels) lists, length P + C + R + 1."""
    p = len(prompt)
    ids = prompt + chosen + prompt[-1:] + rejected
    pos = list(range(p + len(chosen))) + list(range(p - 1, p + len(rejected)))
    seg = [PROMPT] * (p - 1) + [CHOSEN] * (len(chosen) + 1) + [REJECTED] * (len(rejected) + 1)
    labels = [IGNORE_INDEX] * p + chosen + [IGNORE_INDEX] + rejected
    return ids, pos, seg, labels


def pack_pairs(examples: list[dict], *, max_length: int | None, row_tokens: int) -> dict[str, torch.Tensor]:
    """Rows {prompt_ids, chosen_ids, rejected_ids} -> the packed batch (PACK_KEYS).

    Answers are cut as TRL's collator cuts them (prompt + answer to max_length, keep_start), so the
    padded batch TRL builds from the same rows, (2B, L) with chosen rows first, is what `pack_dst`
    indexes: pack_dst[i] is the flat index in TRL's (2B, L - 1) per-token layout of the answer token
    whose log-prob is at flat index pack_src[i] of the packed (rows, T - 1) layout."""
    from glmtune.train.data import pack_rows_best_fit

    n = len(examples)
    cut = (lambda p, a: a[: max(max_length - len(p), 0)]) if max_length else (lambda p, a: a)
    pairs = [(ex["prompt_ids"], cut(ex["prompt_ids"], ex["chosen_ids"]), cut(ex["prompt_ids"], ex["rejected_ids"]))
             for ex in examples]
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)   # L of TRL's padded batch
    lengths = [len(p) + len(c) + len(r) + 1 for p, c, r in pairs]
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
    return {"pack_input_ids": ids, "pack_position_ids": pos, "pack_labels": labels, "pack_pair": pair,
            "pack_seg": seg, "pack_src": torch.tensor(src), "pack_dst": torch.tensor(dst)}


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


@dataclass
class PackedCollator:
    """TRL's DataCollatorForPreference batch (TRL's loss reads its masks) + the packed rows (PACK_KEYS)."""
    base: object                # trl DataCollatorForPreference
    row_tokens: int

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.base(examples)
        batch.update(pack_pairs(examples, max_length=self.base.max_length, row_tokens=self.row_tokens))
        return batch


def packed_token_outputs(model, pack: dict, *, n_seqs: int, width: int, boolean_mask: bool):
    """One packed forward -> TRL's fused-head output with every per-token field laid out as TRL's padded
    (n_seqs, width - 1) batch (zeros where no answer token is scored)."""
    mask = pair_mask(pack["pack_pair"], pack["pack_seg"], boolean=boolean_mask)
    out = model(input_ids=pack["pack_input_ids"], position_ids=pack["pack_position_ids"], attention_mask=mask,
                labels=pack["pack_labels"], fused_lm_head=True, use_cache=False)
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
    """`base` (glmtune's DPOTrainer) with packed forwards when built with `pack_tokens`; without it, base."""

    class GlmtunePackedDPOTrainer(base):
        def __init__(self, *args, pack_tokens: int | None = None, **kwargs):
            self.pack_tokens = pack_tokens
            if pack_tokens:
                from trl.trainer.dpo_trainer import DataCollatorForPreference
                targs = kwargs["args"]
                kwargs["data_collator"] = PackedCollator(
                    DataCollatorForPreference(pad_token_id=kwargs["processing_class"].pad_token_id,
                                              max_length=targs.max_length, truncation_mode=targs.truncation_mode),
                    row_tokens=pack_tokens)
            super().__init__(*args, **kwargs)
            if pack_tokens and self.ld_alpha is not None:
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
            pack = {k: inputs.pop(k) for k in PACK_KEYS}
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


def decide_packing(cfg, model) -> tuple[int | None, str]:
    """align.packing for a loaded policy -> (row tokens or None, the reason). Packing needs a model that
    takes a custom 4D mask as it is (transformers-native) and a kernel that reads one (sdpa, eager)."""
    from glmtune.errors import ConfigError
    from glmtune.train.loop import reads_packing_from_position_ids

    impl = getattr(model.config, "_attn_implementation", None) or cfg.model.attn_implementation
    problem = None
    if not reads_packing_from_position_ids(model):
        problem = "the model runs its own (remote) code, which may not take a custom attention mask"
    elif impl not in ("sdpa", "eager"):
        problem = f"model.attn_implementation {impl} takes no block mask (use sdpa or eager)"
    if cfg.align.packing is True and problem:
        raise ConfigError(f"align.packing: {problem}", field="align.packing", fix="set align.packing: auto or false")
    if cfg.align.packing is False or problem:
        return None, f"dpo: padded pairs (TRL's collator): {problem or 'align.packing is false'}"
    tokens = cfg.align.pack_tokens or 4 * cfg.data.cutoff_len
    return tokens, f"dpo: packed pairs (prompt once per pair, block mask, rows of <= {tokens} tokens)"
