"""Prefill forwards of fixed token counts, replayed from CUDA graphs.

Why: an eager prefill forward of the 9B shape is host-bound below ~2,000 tokens. On the H200 one
160-token prompt took 75 ms (bench/RESULTS.md, session 13), a few ms of it device work, and under
`glmtune serve` requests arrive spread over tens of ms, so many prefill forwards are small, and each
holds every decoding stream for the host's whole time. As for the decode step (and
`glmtune.train.graphs` in training), a fixed shape makes the forward graphable:

  * the packed row is padded to a bucket of ``tokens`` (:data:`PREFILL_BUCKETS`);
  * the chunks' boundaries are fixed-length offset vectors for FlashAttention varlen (``max_chunks``
    + 2 entries; unused entries repeat the last offset: empty sequences), the keys each chunk reads a
    fixed-length index of ``keys`` cache positions;
  * the padding is one more sequence: its tokens write their keys to the scratch position of slot 0
    (which no request ever attends) and attend to those keys, so its rows stay finite (garbage rows
    of NaN would turn into NaN keys at the scratch position, and 0 x NaN is NaN in a decode step's
    masked attention);
  * the logits of the ``max_chunks`` kept positions are copied to a buffer outside the graph's pool.

A forward that fits no captured bucket (more chunks, or a chunk attending to many cached positions)
runs eagerly as before. On a CPU there are no graphs: the same padded forward runs eagerly (what the
tests compare with ``generate``).
"""
from __future__ import annotations

from glmtune.infer.engine.attention import PrefillChunk, slot_positions, varlen_key_indices
from glmtune.models.speed import padded_offsets

PREFILL_BUCKETS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
MAX_CHUNKS = 64
FIELDS = ("ids", "positions", "write_slots", "write_pos", "keep", "cu_q", "cu_k", "key_slots", "key_pos")


def field_sizes(tokens: int, keys: int, max_chunks: int) -> dict[str, int]:
    """How many int64 entries each input of a (tokens, keys) forward has, in :data:`FIELDS` order."""
    per_token = dict.fromkeys(("ids", "positions", "write_slots", "write_pos"), tokens)
    return {**per_token, "keep": max_chunks, "cu_q": max_chunks + 2, "cu_k": max_chunks + 2,
            "key_slots": keys, "key_pos": keys}


def needs(parts: list[PrefillChunk]) -> tuple[int, int]:
    """(query tokens, keys) of the chunks as they are, before padding."""
    return sum(p.length for p in parts), sum(p.start + p.length for p in parts)


def fits(parts: list[PrefillChunk], tokens: int, keys: int, max_chunks: int) -> bool:
    """Whether the chunks, padded to ``tokens`` (the padding attends to as many keys), fit a forward
    of (tokens, keys)."""
    real, real_keys = needs(parts)
    return len(parts) <= max_chunks and real <= tokens and real_keys + (tokens - real) <= keys


def padded_layout(parts: list[PrefillChunk], ids: list[int], keep: list[int], *, tokens: int, keys: int,
                  scratch: int, max_chunks: int = MAX_CHUNKS):
    """The inputs of a (tokens, keys) forward as one CPU int64 vector, :data:`FIELDS` in order.

    ``ids``: the chunks' tokens packed; ``keep``: packed positions whose logits are wanted (one per
    chunk that ends its prompt). Raises ValueError when the chunks do not fit."""
    import torch

    if not fits(parts, tokens, keys, max_chunks):
        raise ValueError(f"{len(parts)} chunks of {needs(parts)} (tokens, keys) do not fit ({tokens}, {keys})")
    real, real_keys = needs(parts)
    pad = tokens - real
    empty = torch.zeros(0, dtype=torch.long)
    write_slots, write_pos = slot_positions([(p.slot, p.start, p.start + p.length) for p in parts]) if parts \
        else (empty, empty)
    key_slots, key_pos = varlen_key_indices(parts) if parts else (empty, empty)
    # the padding is one more sequence (`pad` queries over `pad` keys, all at slot 0's scratch)
    cu_q = padded_offsets([p.length for p in parts], tokens, max_chunks + 1)
    cu_k = padded_offsets([p.start + p.length for p in parts], real_keys + pad, max_chunks + 1)

    def padded(values, n: int, fill: int):
        t = torch.as_tensor(values, dtype=torch.long)
        return torch.cat([t, torch.full((n - t.numel(),), fill, dtype=torch.long)])

    # a real token is written where it sits (its position); the padding sits at 0, written at scratch
    return torch.cat([padded(ids, tokens, 0), padded(write_pos, tokens, 0), padded(write_slots, tokens, 0),
                      padded(write_pos, tokens, scratch), padded(keep, max_chunks, 0),
                      torch.tensor(cu_q, dtype=torch.long), torch.tensor(cu_k, dtype=torch.long),
                      padded(key_slots, keys, 0), padded(key_pos, keys, scratch)])


class PrefillGraphs:
    """Captured prefill forwards by (tokens, keys, adapters), their static inputs and the kept logits.

    ``body(views, tokens, keys, adapters)`` runs the model's forward on the input views (a dict of
    :data:`FIELDS`) and returns the kept logits ((max_chunks, vocab)); the runner owns it."""

    def __init__(self, body, device, *, scratch: int, max_tokens: int, graphs: bool,
                 max_chunks: int = MAX_CHUNKS, buckets=PREFILL_BUCKETS):
        self.body, self.device, self.scratch, self.max_chunks = body, device, scratch, max_chunks
        self.buckets = tuple(b for b in buckets if b <= max_tokens) or (buckets[0],)
        self.use_graphs = graphs                 # False (a CPU): the padded forward runs eagerly
        self.graphs: dict[tuple, object] = {}
        self.inputs: dict[tuple, object] = {}    # key -> its static int64 input vector
        self.logits = None                       # (max_chunks, vocab), outside every graph's pool
        self.pool = None
        self.failure: str | None = None          # the capture that failed (forwards run eagerly since)

    @property
    def active(self) -> bool:
        return self.failure is None

    def key_sizes(self, tokens: int) -> tuple[int, ...]:
        """The key counts captured for a token bucket: the chunks' own (fresh prompts), and twice that
        (chunks after cached positions: a long prompt's later chunks, prefix hits)."""
        return (tokens, 2 * tokens)

    def choose(self, parts: list[PrefillChunk], adapters: bool) -> tuple | None:
        """The smallest (tokens, keys, adapters) forward the chunks fit; None: run them eagerly."""
        if not self.active:
            return None
        for tokens in self.buckets:
            for keys in self.key_sizes(tokens):
                if fits(parts, tokens, keys, self.max_chunks):
                    return tokens, keys, adapters
        return None

    def layout(self, key: tuple, parts: list[PrefillChunk], ids: list[int], keep: list[int]):
        """The CPU input vector of ``key``'s forward over these chunks (:func:`padded_layout`)."""
        return padded_layout(parts, ids, keep, tokens=key[0], keys=key[1], scratch=self.scratch,
                             max_chunks=self.max_chunks)

    def run(self, key: tuple, flat):
        """The kept logits ((max_chunks, vocab), rows in ``keep``'s order) of the forward over ``flat``
        (its :meth:`layout`, on the device), replayed from its graph (captured now if it is new);
        None when the capture fails."""
        tokens, keys, _ = key
        if not self.use_graphs:
            return self.body(self._views(flat, tokens, keys), tokens, keys, key[2])
        graph = self.graphs.get(key) or self.capture(key)
        if graph is None:
            return None
        self.inputs[key].copy_(flat)
        graph.replay()
        return self.logits

    def capture_all(self, adapters: bool) -> int:
        """Capture every bucket's forwards now (largest first: the smaller ones reuse its pool memory)."""
        for tokens in reversed(self.buckets):
            for keys in self.key_sizes(tokens):
                if self.active and (tokens, keys, adapters) not in self.graphs:
                    self.capture((tokens, keys, adapters))
        return len(self.graphs)

    def capture(self, key: tuple):
        """Capture the forward of ``key`` over an all-padding input (it writes only slot 0's scratch
        position); a failure turns prefill graphs off (eager prefill from then on, the reason kept)."""
        import torch

        tokens, keys, adapters = key
        static = padded_layout([], [], [], tokens=tokens, keys=keys, scratch=self.scratch,
                               max_chunks=self.max_chunks).to(self.device)
        views = self._views(static, tokens, keys)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    logits = self.body(views, tokens, keys, adapters)
                    if self.logits is None:
                        self.logits = torch.empty_like(logits)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.logits.copy_(self.body(views, tokens, keys, adapters))
        except Exception as e:  # noqa: BLE001 - any capture failure means: eager prefill
            self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return None
        self.graphs[key], self.inputs[key] = graph, static
        return graph

    def _views(self, flat, tokens: int, keys: int) -> dict:
        import torch

        sizes = field_sizes(tokens, keys, self.max_chunks)
        return dict(zip(FIELDS, torch.split(flat, list(sizes.values()))))
