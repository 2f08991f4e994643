"""The KV cache: one preallocated (slots, Hkv, length, D) tensor pair per attention layer, and a
prefix store that reuses the cached keys of prompt prefixes many requests share.

Slots, not pages: a running request owns one slot of ``length`` positions, so the decode step reads
a batch as a plain view ``k[:B, :, :L]`` (no gather, no page table: plain SDPA and one CUDA graph per
batch and length bucket). The price is memory reserved for a whole context per request; the slot
count is sized from free GPU memory and requests wait for a slot instead of running out of memory.
The last position of every slot is scratch: rows of a decode step that are not decoding write there.

Prefix reuse: prompts are cut into blocks of ``PREFIX_BLOCK`` tokens, each block named by a hash
of every token up to its end and of the adapter the request runs (an adapter changes every layer's
keys, so its prefix is not the base model's, nor another adapter's). A block-aligned prefix seen in two prompts is copied, after the second
one's prefill, into a reserved prefix slot; later prompts starting with it copy its keys into their
own slot (a memory copy, ~µs) instead of recomputing them (a forward over the prefix).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

PREFIX_BLOCK = 16


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    k_dim: int
    v_dim: int


def bytes_per_token(shapes: dict[int, LayerShape], dtype_bytes: int) -> int:
    return sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes.values()) * dtype_bytes


class SlotCache:
    """K/V for ``slots`` sequences of up to ``length`` positions, every attention layer."""

    def __init__(self, shapes: dict[int, LayerShape], slots: int, length: int, dtype, device):
        import torch

        self.slots, self.length, self.dtype, self.device = slots, length, dtype, device
        self.k = {i: torch.zeros(slots, s.kv_heads, length, s.k_dim, dtype=dtype, device=device)
                  for i, s in shapes.items()}
        self.v = {i: torch.zeros(slots, s.kv_heads, length, s.v_dim, dtype=dtype, device=device)
                  for i, s in shapes.items()}

    def layer(self, i: int):
        return self.k[i], self.v[i]

    def attach(self, modules: dict) -> None:
        """Give each attention module (layer index -> module) its layer's K/V as non-persistent
        buffers, which the decode attention reads (see attention._decode); ``detach`` removes them."""
        from glmtune.infer.engine.attention import CACHE_K, CACHE_V

        self._attached = dict(modules)
        for i, module in self._attached.items():
            module.register_buffer(CACHE_K, self.k[i], persistent=False)
            module.register_buffer(CACHE_V, self.v[i], persistent=False)

    def detach(self) -> None:
        from glmtune.infer.engine.attention import CACHE_K, CACHE_V

        for module in getattr(self, "_attached", {}).values():
            for name in (CACHE_K, CACHE_V):
                if hasattr(module, name):
                    delattr(module, name)  # nn.Module's way to drop a buffer
        self._attached = {}

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of slot ``src`` into slot ``dst`` (every layer)."""
        if src == dst or n <= 0:
            return
        for cache in (self.k, self.v):
            for t in cache.values():
                t[dst, :, :n].copy_(t[src, :, :n])


class PrefixStore:
    """Which block-aligned prompt prefixes sit in which reserved slot (LRU), and how often each
    prefix has been seen (a prefix is stored the second time it comes, not the first)."""

    def __init__(self, slots: list[int], max_seen: int = 8192):
        self.free = list(slots)
        self.stored: OrderedDict[int, tuple[int, int]] = OrderedDict()  # hash -> (slot, length)
        self.seen: OrderedDict[int, int] = OrderedDict()                # hash -> times seen
        self.max_seen = max_seen

    @staticmethod
    def block_hashes(prompt: list[int], adapter: int = -1) -> list[int]:
        """Hash of every block-aligned prefix shorter than the prompt (one token is always computed),
        under ``adapter`` (-1: the base model)."""
        hashes, h = [], hash(("adapter", adapter))
        for end in range(PREFIX_BLOCK, len(prompt), PREFIX_BLOCK):
            h = hash((h, tuple(prompt[end - PREFIX_BLOCK:end])))
            hashes.append(h)
        return hashes

    def lookup(self, hashes: list[int]) -> tuple[int, int] | None:
        """(slot, length) of the longest stored prefix of these block hashes."""
        for i in range(len(hashes) - 1, -1, -1):
            hit = self.stored.get(hashes[i])
            if hit is not None:
                self.stored.move_to_end(hashes[i])
                return hit
        return None

    def note(self, hashes: list[int]) -> int:
        """Count this prompt's prefixes; the length worth storing after its prefill (0: none)."""
        worth = 0
        for i, h in enumerate(hashes):
            count = self.seen.pop(h, 0) + 1
            self.seen[h] = count
            if count >= 2 and h not in self.stored:
                worth = (i + 1) * PREFIX_BLOCK
        while len(self.seen) > self.max_seen:
            self.seen.popitem(last=False)
        return worth if self.free or self.stored else 0

    def place(self, h: int, length: int) -> int:
        """A slot for prefix ``h`` (the least recently used one when none is free)."""
        if self.free:
            slot = self.free.pop()
        else:
            _, (slot, _) = self.stored.popitem(last=False)
        self.stored[h] = (slot, length)
        return slot
