"""Training data: records -> template-encoded (input_ids, labels) -> padded or packed batches.

Shapes: an encoded example is two equal-length int lists; a padded batch is (B, T) with
attention_mask; a packed batch is (1, sum of lengths) with position_ids restarting at 0 for each
conversation and no attention_mask, which transformers reads as "padding-free packed sequences"
(sdpa/eager/flex build a block-diagonal causal mask from the position ids; flash_attention_2 runs
its varlen kernel on the cumulative lengths). The loss is the mean over trained tokens of the whole
optimizer step, so both layouts give the same loss on the same conversations.
"""
from __future__ import annotations

import math
import random
from typing import Iterable, Iterator

import torch

from glmtune.data.cutoff import Example, fit_records  # noqa: F401  (Example is re-exported: one encoded conversation)
from glmtune.errors import InputError
from glmtune.templates import IGNORE_INDEX


# --------------------------------------------------------------------------------------------------
# records

def split_dev(records: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then hold out val_size (share if <1, else count) as the dev split."""
    if not val_size:
        return records, []
    n_dev = int(round(len(records) * val_size)) if val_size < 1 else int(val_size)
    n_dev = max(1, min(n_dev, len(records) - 1))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    dev = [records[i] for i in sorted(order[:n_dev])]
    train = [records[i] for i in sorted(order[n_dev:])]
    return train, dev


# --------------------------------------------------------------------------------------------------
# encoding

def encode_records(records: list[dict], tokenizer, template, *, cutoff_len: int, on_overflow: str = "truncate",
                   train_on: str = "all_assistant", truncate_side: str = "left") -> tuple[list[Example], dict]:
    """Encode each record with the template's loss mask under the one overflow policy (glmtune.data.cutoff,
    the same function `glmtune data stats --cutoff` reports from).

    Returns the examples and counts {"encoded", "truncated", "dropped", "answer_too_long", "no_loss"}
    ("dropped" includes "answer_too_long"). A system prompt that alone reaches cutoff_len is a config error.
    """
    examples, report = fit_records(records, template, tokenizer, cutoff_len, train_on=train_on,
                                   on_overflow=on_overflow, side=truncate_side)
    if records and not examples:
        raise nothing_left_error(report, train_on)
    return examples, report.counts()


def nothing_left_error(report, train_on: str) -> InputError:
    """Why encoding kept none of the records (glmtune.data.cutoff's report), and the setting that fixes it."""
    reasons, fixes, needs = [], [], 0
    if report.answer_too_long:
        reasons.append(f"{report.answer_too_long} dropped because the tokens the cut never removes (template "
                       f"tokens, role headers, system prompt, last answer) alone exceed it")
        needs = report.answer_too_long_needs
    if report.dropped:
        reasons.append(f"{report.dropped} longer than it dropped (on_overflow: drop)")
        needs = max(needs, report.longest)
    if needs:
        fixes.append(f"set data.cutoff_len to at least {needs}"
                     + (" or on_overflow: truncate" if report.dropped else ""))
    if report.no_loss:
        reasons.append(f"{report.no_loss} without a trained token (train_on: {train_on})")
        fixes.append("check data.train_on and that each conversation ends with an assistant answer")
    fixes.append("`glmtune data stats DATA --template T --tokenizer MODEL --cutoff N` prints what a cutoff keeps")
    return InputError(f"no training examples left after encoding: of {report.total} conversations at "
                      f"data.cutoff_len {report.cutoff}, {'; '.join(reasons)}",
                      field="data.cutoff_len" if needs else "data.train_on", fix="; ".join(fixes))


# --------------------------------------------------------------------------------------------------
# batches (pure functions on lists of examples)

def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Shapes: input_ids/attention_mask/labels (B, T)."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_position_ids(lengths: list[int]) -> torch.Tensor:
    """[3, 2] -> [0, 1, 2, 0, 1]: positions restart for each packed conversation."""
    return torch.cat([torch.arange(n) for n in lengths])


def block_causal_mask(lengths: list[int], dtype=torch.float32) -> torch.Tensor:
    """Additive (1, 1, T, T) mask: token i sees token j iff same conversation and j <= i.

    For kernels that cannot read packing from position ids (e.g. remote-code models): 0 where
    attention is allowed, dtype-min elsewhere, the form eager and sdpa both accept.
    """
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    T = int(seq.numel())
    allowed = (seq[:, None] == seq[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def pack_batch(examples: list[Example], *, block_mask: bool = False, varlen: bool = False) -> dict:
    """Concatenate the examples into one row (1, sum T_i), padding-free.

    The first label of every conversation is set to IGNORE_INDEX: after the causal shift it would be
    predicted from the previous conversation's last token. (Templates never train the first token
    anyway, so this changes nothing for unpacked data, which keeps packed == unpacked.)
    `varlen=True` adds the FlashAttention-style kwargs of glmtune.models.speed's varlen attention:
    cu_seq_lens_q/k (N+1,) int32 cumulative offsets and max_length_q/k (python ints).
    """
    lengths = [len(e) for e in examples]
    ids = torch.tensor([t for e in examples for t in e.input_ids])[None]
    labels = torch.tensor([t for e in examples for t in [IGNORE_INDEX] + e.labels[1:]])[None]
    batch = {"input_ids": ids, "labels": labels, "position_ids": packed_position_ids(lengths)[None]}
    if block_mask:
        batch["attention_mask"] = block_causal_mask(lengths)
    if varlen:
        from glmtune.models.speed import cu_seqlens_kwargs
        batch.update(cu_seqlens_kwargs(lengths, "cpu"))
    return batch


def pack_rows_best_fit(lengths: Iterable[int], tokens: int, lookahead: int = 16) -> Iterator[list[int]]:
    """Group a stream of sequence lengths into rows of at most `tokens` tokens; yields stream indices.

    Online best fit: each row takes, again and again, the longest of the next `lookahead` waiting
    sequences that still fits, so rows come out nearly full (what fixed-size CUDA-graphed rows pay for
    as padding) while sequences stay close to their stream order."""
    it = iter(enumerate(lengths))
    waiting: list[tuple[int, int]] = []

    def refill() -> None:
        while len(waiting) < lookahead:
            nxt = next(it, None)
            if nxt is None:
                return
            if nxt[1] > tokens:
                raise ValueError(f"sequence {nxt[0]} has {nxt[1]} tokens, more than a row of {tokens}: "
                                 "raise the row size or lower data.cutoff_len")
            waiting.append(nxt)

    refill()
    while waiting:
        row, room = [], tokens
        while True:
            fits = [w for w in waiting if w[1] <= room]
            if not fits:
                break
            pick = max(fits, key=lambda w: (w[1], -w[0]))
            waiting.remove(pick)
            row.append(pick[0])
            room -= pick[1]
            refill()
        yield row


def collate(examples: list[Example], *, packing: bool, pad_id: int, block_mask: bool = False,
            varlen: bool = False) -> dict:
    return (pack_batch(examples, block_mask=block_mask, varlen=varlen) if packing
            else pad_batch(examples, pad_id))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over trained tokens, and their count.

    logits (B, T, V), labels (B, T); position t predicts labels[t + 1]. Upcast to fp32 so bf16 logits
    do not lose precision in the log-sum-exp. Returning (sum, count) rather than a mean lets the
    loop divide by the token count of the whole optimizer step across micro-batches and processes.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------------------------------
# order: a deterministic stream of micro-batches, so resuming needs only the step number

class BatchStream:
    """Micro-batches over epochs in a seeded order, sharded over processes.

    Epoch e's order is `randperm(n, seed + e)`. A *global* micro-batch is `batch_size x world` examples;
    process r takes every world-th of them (r, r + world, ...). One process with batch 2B therefore
    sees exactly the conversations that two processes with batch B see together. A global batch
    smaller than the world size (an epoch's tail) is skipped so no process gets an empty batch.

    `lengths` (tokens per example): the global micro-batch is dealt out by tokens instead (longest
    first, each to the process with the fewest tokens that still has room): every process waits for
    the slowest at the gradient all-reduce, and a round-robin deal of U[300, 1100)-token conversations
    leaves one process ~10% more tokens on average. The set of conversations per step is unchanged.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, lengths: list[int] | None = None):
        if n == 0:
            raise InputError("no training examples left after encoding", field="data.datasets")
        self.n, self.bs, self.seed, self.rank, self.world, self.shuffle = n, batch_size, seed, rank, world, shuffle
        self.lengths = lengths
        g = batch_size * world
        self.per_epoch = n // g + (1 if n % g >= world else 0)
        if self.per_epoch == 0:
            raise InputError(f"{n} examples are fewer than the {world} processes", field="data.datasets")

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def indices(self, k: int) -> list[int]:
        """Indices of this process's k-th micro-batch (k counts from 0 over all epochs)."""
        epoch, j = divmod(k, self.per_epoch)
        g = self.bs * self.world
        gb = self._order(epoch)[j * g:(j + 1) * g]
        if self.world == 1 or self.lengths is None:
            return gb[self.rank::self.world]
        return deal_by_tokens(gb, self.lengths, self.world)[self.rank]

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch


def deal_by_tokens(batch: list[int], lengths: list[int], world: int) -> list[list[int]]:
    """Split a global micro-batch over `world` processes, balancing tokens: longest first, each to the
    process with the fewest tokens among those with fewer than ceil(len / world) examples (ties: lower
    rank). The first `world` examples land on distinct processes, so none is left empty."""
    room = -(-len(batch) // world)
    shards: list[list[int]] = [[] for _ in range(world)]
    tokens = [0] * world
    for i in sorted(batch, key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(world) if len(shards[r]) < room), key=lambda r: (tokens[r], r))
        shards[r].append(i)
        tokens[r] += lengths[i]
    return shards


def total_steps(per_epoch: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    return max_steps if max_steps else max(1, math.ceil(per_epoch * epochs / grad_accum))
