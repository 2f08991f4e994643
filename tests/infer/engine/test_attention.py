"""The prefill's cache indices (glmtune.infer.engine.attention): one scatter per layer writes every
packed chunk where the per-chunk copies wrote it, and one gather per layer packs exactly the keys
FlashAttention's varlen call read from per-chunk slices (concatenated in chunk order)."""
from __future__ import annotations

import torch

from glmtune.infer.engine.attention import PrefillChunk, prefill_indices, varlen_key_indices

# slot 3 from scratch, slot 0 continuing at position 5 (a chunked prompt or a cached prefix), slot 2
CHUNKS = [PrefillChunk(slot=3, start=0, length=4, offset=0), PrefillChunk(slot=0, start=5, length=3, offset=4),
          PrefillChunk(slot=2, start=0, length=1, offset=7)]
SLOTS, HEADS, LENGTH, DIM = 4, 2, 10, 3


def test_one_scatter_writes_what_the_per_chunk_copies_wrote():
    torch.manual_seed(0)
    key = torch.randn(1, HEADS, 8, DIM)  # (1, Hkv, T, D) as the attention receives it
    start = torch.randn(SLOTS, HEADS, LENGTH, DIM)
    want = start.clone()
    for c in CHUNKS:
        want[c.slot, :, c.start:c.start + c.length] = key[0, :, c.offset:c.offset + c.length]
    got = start.clone()
    slots, pos = prefill_indices(CHUNKS)
    got[slots, :, pos] = key[0].transpose(0, 1)
    assert slots.tolist() == [3, 3, 3, 3, 0, 0, 0, 2] and pos.tolist() == [0, 1, 2, 3, 5, 6, 7, 0]
    assert torch.equal(got, want)
    assert not torch.equal(got, start)


def test_one_gather_packs_the_keys_of_every_chunk_in_order():
    torch.manual_seed(1)
    cache = torch.randn(SLOTS, HEADS, LENGTH, DIM)
    want = torch.cat([cache[c.slot, :, :c.start + c.length].transpose(0, 1) for c in CHUNKS])
    slots, pos = varlen_key_indices(CHUNKS)
    got = cache[slots, :, pos]
    assert got.shape == (4 + 8 + 1, HEADS, DIM)
    assert torch.equal(got, want)
