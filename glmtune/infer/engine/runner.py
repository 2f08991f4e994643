"""The model side of the engine: per-slot state on the device, the prefill forward, and the decode
step, eager or replayed from a CUDA graph.

Why hand-written (and not ``generate`` or transformers' continuous batching): on one H200 the
9B-shape decode step's kernels take ~5 ms while transformers spends ~70 ms of Python issuing
them; a decode step captured once as a CUDA graph per (batch, length) bucket and replayed costs a
few µs of host time. The model's own forward (its modelling code, unchanged) is what is captured;
only attention and the cache are ours (:mod:`.attention`, :mod:`.cache`).

Inside a graph the host cost is gone, but the eager modelling code still issues ~60 small kernels
per layer (RMSNorm in six, rotary in twenty, ...), ~2,600 per step on the 9B shape, which on an H200
cost more than the GEMMs' weight reads at batch 1. With ``compile`` each decoder layer of a decode
step runs through one ``torch.compile``'d function (inductor, dynamic batch and width; the engine's
attention and its cache writes trace into it) before the graph is captured, so a layer is ~12
kernels. Regional, not whole-model: every layer reuses the one compile (its cache comes as buffers of
its own module, not by layer index), a minute at start instead of many. The compiled step is tested
for equality against the eager one; a compile failure is kept (``compile_failure``) and the step runs
eagerly from then on.

The prefill forward is not compiled as a whole: its token count and layout change every time, and
compiled through the decode step's function (dynamic shapes) on the H200 it kept compiling new
variants under `glmtune serve` (6-16 s stalls, and ~80 ms decode steps after: bench/RESULTS.md,
session 12). With decode graphs on CUDA it is instead padded to a bucket of tokens and replayed from
a CUDA graph of its own (:mod:`.prefill_graphs`; a forward that fits no bucket runs eagerly). With
``compile_prefill`` the eager forward's pointwise parts (norms, MLP, rotary) run through compiled
regions (:mod:`.regions`). Its inputs (ids, positions, cache indices)
are built on the host and go to the device in one non-blocking copy, so the host queues the forward
while the device still runs the decode step before it.

Device state, one row per slot: the last token, the position of the next write, whether the row is
decoding, the decoding settings, the answer length and its cap, the adapter index, and (lazily)
which tokens a row has seen (for the repetition penalty). A decode step reads and advances it
entirely on the device and writes (token, finished) to an output buffer that is copied to pinned
host memory without waiting: the host reads step t while the device runs step t + 1.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

from glmtune.infer.engine.attention import (PrefillChunk, StepContext, engine_forward, prefill_indices,
                                            varlen_key_indices)
from glmtune.infer.engine.prefill_graphs import PrefillGraphs
from glmtune.infer.engine.regions import PrefillRegions, allow_recompiles
from glmtune.infer.engine.sampling import SamplingRows, is_stop, next_tokens
from glmtune.models.loading import find_decoder

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_LENGTH_BUCKET = 128


def bucket(n: int, ladder) -> int:
    for b in ladder:
        if b >= n:
            return b
    raise ValueError(f"{n} is past the largest bucket {ladder[-1]}")


def length_buckets(length: int) -> tuple[int, ...]:
    """Attention widths a decode step may use: powers of two from 128, and the full slot."""
    out, w = [], MIN_LENGTH_BUCKET
    while w < length:
        out.append(w)
        w *= 2
    return tuple(out) + (length,)


@dataclass
class Pending:
    """A step's results on their way to the host: (tokens, finished) of ``rows`` in pinned memory."""
    tokens: object
    finished: object
    event: object
    rows: list  # the Sequence in each row when the step was launched


class ModelRunner:
    def __init__(self, model, cache, *, stop_ids: list[int], lora=None, use_graphs: bool = False,
                 compile: bool = False, compile_prefill: bool = False, prefill_graphs: bool = False,
                 prefill_tokens: int = 4096, lock=None):
        import contextlib

        import torch

        self.model, self.cache, self.lora = model, cache, lora
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.device = cache.device
        self.vocab = int(model.config.get_text_config().vocab_size)
        n = cache.slots
        z = lambda dtype: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        self.tokens, self.pos, self.answer_len, self.max_new = z(torch.long), z(torch.long), z(torch.long), z(torch.long)
        self.active = z(torch.bool)
        self.temperature, self.top_p, self.penalty = z(torch.float32), z(torch.float32) + 1, z(torch.float32) + 1
        self.top_k, self.seed = z(torch.long), z(torch.long)
        self.adapter = z(torch.long) - 1
        self.presence = None  # (slots, vocab) bool, made when a request first asks for a penalty
        self.stop_ids = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=self.device)
        self.out_tokens, self.out_finished = z(torch.long), z(torch.bool)
        self.scratch = cache.length - 1
        self.use_graphs = use_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.graph_pool = None
        self.graph_failure: str | None = None
        self.compiled = torch.compile(_layer_forward, dynamic=True) if compile else None
        if compile:  # the compiled layer's variants: batch 1 / dynamic x with / without adapters x selection
            allow_recompiles(32)
        self.layers = find_decoder(model).layers if compile else []
        self.compile_failure: str | None = None
        self.regions = PrefillRegions(model) if compile_prefill else None
        # prefill forwards padded to token buckets: replayed from CUDA graphs (with decode graphs), or
        # eagerly (a CPU in tests); forwards they do not fit run as below
        self.prefill_graphs = PrefillGraphs(self._padded_forward, self.device, scratch=self.scratch,
                                            max_tokens=prefill_tokens, graphs=use_graphs) if prefill_graphs else None
        self._host = [self._pinned(n) for _ in range(4)]  # <= 3 steps' results in flight
        self._flip = 0

    # -- per-slot state ---------------------------------------------------------------------------
    def set_row(self, slot: int, *, temperature: float, top_p: float, top_k: int, penalty: float, seed: int,
                max_new: int, adapter: int) -> None:
        self.temperature[slot], self.top_p[slot], self.top_k[slot] = temperature, top_p, top_k
        self.penalty[slot], self.seed[slot], self.max_new[slot], self.adapter[slot] = penalty, seed, max_new, adapter
        self.active[slot] = False
        self.answer_len[slot] = 0

    def mark_seen(self, slot: int, token_ids) -> None:
        """Record prompt tokens for the repetition penalty (rows without one never look)."""
        import torch

        if self.presence is None:
            self.presence = torch.zeros(self.cache.slots, self.vocab, dtype=torch.bool, device=self.device)
            self.graphs = {k: v for k, v in self.graphs.items() if not k[2]}  # recapture with the buffer
        self.presence[slot] = False
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        self.presence[slot, ids.clamp_(0, self.vocab - 1)] = True

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s request moves to ``dst`` (compaction): its keys and its row of state."""
        self.cache.copy(src, dst, length)
        for t in (self.tokens, self.pos, self.answer_len, self.max_new, self.active, self.temperature,
                  self.top_p, self.penalty, self.top_k, self.seed, self.adapter):
            t[dst] = t[src]
        if self.presence is not None:
            self.presence[dst] = self.presence[src]
        self.active[src] = False

    def deactivate(self, slot: int) -> None:
        self.active[slot] = False

    def _rows(self, index) -> SamplingRows:
        return SamplingRows(self.temperature[index], self.top_p[index], self.top_k[index], self.penalty[index],
                            self.seed[index], self.answer_len[index])

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, chunks: list[tuple[int, list[int], int, bool]], *, sampling: bool, rows: list) -> Pending | None:
        """One forward over prompt chunks ``(slot, ids, start, last)``; ``last``: the chunk ends its
        prompt, so its last logits choose the answer's first token. Returns those tokens in flight."""
        import torch

        with self.lock, torch.inference_mode():
            return self._prefill(chunks, sampling, rows)

    def _prefill(self, chunks, sampling: bool, rows: list) -> Pending | None:
        logits, slots, ends_t = self._prefill_forward(chunks)
        if slots is None:
            return None
        presence = self.presence[slots] if (sampling and self.presence is not None) else None
        first = next_tokens(logits, self._rows(slots), presence, sampling=sampling)
        self.tokens[slots] = first
        self.pos[slots] = ends_t
        self.answer_len[slots] = 1
        if self.presence is not None:
            self.presence[slots, first] = True
        done = is_stop(first, self.stop_ids, self.answer_len[slots], self.max_new[slots])
        self.active[slots] = ~done
        return self._send(first, done, rows)

    def _prefill_forward(self, chunks):
        """The packed forward over ``chunks``: (logits of each finishing chunk's last position, the
        finishing slots, their prompts' ends), the last two None when no chunk ends its prompt."""
        import torch

        ids, parts, offset, keep, finishing, ends = [], [], 0, [], [], []
        for slot, chunk, start, last in chunks:
            ids += chunk
            parts.append(PrefillChunk(slot, start, len(chunk), offset))
            offset += len(chunk)
            if last:
                keep.append(offset - 1)
                finishing.append(slot)
                ends.append(start + len(chunk))
        fixed = self._fixed_prefill(parts, ids, keep, finishing, ends)
        if fixed is not None:
            return fixed
        token_slots, positions = prefill_indices(parts)  # a token's position is where it is written
        host = [torch.tensor(ids), positions, token_slots, torch.tensor(keep or [offset - 1]),
                torch.tensor(finishing), torch.tensor(ends)]
        varlen = self._varlen_inputs(parts)
        if varlen is not None:
            host += varlen
        dev = self._upload(host)
        input_ids, position_ids, token_slots, keep_t, slots, ends_t = dev[:6]
        ctx = StepContext(self.cache, "prefill", chunks=parts, token_slots=token_slots, token_pos=position_ids,
                          varlen=None if varlen is None else self._varlen(parts, *dev[6:]))
        lora_ids = None
        if self.lora is not None:
            lora_ids = torch.cat([self.adapter[p.slot].expand(p.length) for p in parts])
        with engine_forward(self.model, ctx), self._lora(lora_ids):
            logits = self._prefill_logits(input_ids[None], position_ids[None], keep_t)[0]
        return _finishing(logits, finishing, slots, ends_t)

    def _fixed_prefill(self, parts, ids, keep, finishing, ends):
        """``_prefill_forward``'s result through a padded forward of a captured bucket (None: the
        chunks fit none, or its capture failed)."""
        import torch

        graphs = self.prefill_graphs
        key = graphs.choose(parts, self.lora is not None) if graphs is not None else None
        if key is None:
            return None
        flat, slots, ends_t = self._upload([graphs.layout(key, parts, ids, keep), torch.tensor(finishing),
                                            torch.tensor(ends)])
        logits = graphs.run(key, flat)
        return None if logits is None else _finishing(logits, finishing, slots, ends_t)

    def _padded_forward(self, views: dict, tokens: int, keys: int, adapters: bool):
        """The forward a prefill graph captures: inputs from the static views of
        :mod:`.prefill_graphs`, the logits of its ``keep`` positions out."""
        import torch

        varlen = {"cu_q": views["cu_q"].to(torch.int32), "cu_k": views["cu_k"].to(torch.int32), "max_q": tokens,
                  "max_k": keys, "k_slots": views["key_slots"], "k_pos": views["key_pos"]}
        ctx = StepContext(self.cache, "prefill", token_slots=views["write_slots"], token_pos=views["write_pos"],
                          varlen=varlen)
        # the padding's tokens run slot 0's adapter: their rows are never read
        selection = self.adapter[views["write_slots"]] if adapters else None
        with engine_forward(self.model, ctx), self._lora(selection):
            return self._logits(views["ids"][None], views["positions"][None], views["keep"])[0]

    def _prefill_logits(self, input_ids, position_ids, keep):
        """The prefill forward, its pointwise regions compiled when asked (and they compile), else eager."""
        regions = self.regions
        if regions is not None and regions.active:
            try:
                with regions.on():
                    return self._logits(input_ids, position_ids, keep)
            except Exception as e:  # noqa: BLE001 - a compile failure means: eager (same cache writes again)
                regions.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return self._logits(input_ids, position_ids, keep)

    def _upload(self, host: list) -> list:
        """CPU int64 vectors -> the same on the device, by one copy that does not wait for the device.

        One ``torch.tensor(..., device=cuda)`` per input would each block the host until the step in
        flight has run (a copy from pageable memory synchronises), so the host could not queue this
        forward's kernels while the device still runs the previous decode step."""
        import torch

        flat = torch.cat([t.reshape(-1).to(torch.long) for t in host])
        if str(self.device).startswith("cuda"):
            flat = flat.pin_memory().to(self.device, non_blocking=True)  # the pinned block is held until copied
        else:
            flat = flat.to(self.device)
        return list(torch.split(flat, [t.numel() for t in host]))

    def _varlen_inputs(self, parts: list[PrefillChunk]) -> list | None:
        """The host side of the FlashAttention inputs (None: CPU, or no varlen kernel: SDPA chunk by chunk)."""
        import torch

        if not str(self.device).startswith("cuda") or not _varlen_ok():
            return None
        k_slots, k_pos = varlen_key_indices(parts)
        cum = lambda xs: torch.tensor([0] + list(_accumulate(xs)))  # noqa: E731
        return [cum([p.length for p in parts]), cum([p.start + p.length for p in parts]), k_slots, k_pos]

    def _varlen(self, parts: list[PrefillChunk], cu_q, cu_k, k_slots, k_pos) -> dict:
        import torch

        return {"cu_q": cu_q.to(torch.int32), "cu_k": cu_k.to(torch.int32), "max_q": max(p.length for p in parts),
                "max_k": max(p.start + p.length for p in parts), "k_slots": k_slots, "k_pos": k_pos}

    # -- decode -----------------------------------------------------------------------------------
    def decode(self, n_rows: int, longest: int, *, sampling: bool, adapters: bool = True, rows: list) -> Pending:
        """One token for rows 0..n_rows-1 (the decoding ones; others idle on the scratch position).
        ``longest``: the most positions any row attends to after this step's write. ``adapters``: some
        row runs an adapter (a step of base-model rows alone skips the LoRA matmuls of every layer)."""
        import torch

        with self.lock, torch.inference_mode():
            return self._decode(n_rows, longest, sampling, adapters and self.lora is not None, rows)

    def _decode(self, n_rows: int, longest: int, sampling: bool, adapters: bool, rows: list) -> Pending:
        b = min(bucket(n_rows, BATCH_BUCKETS), self.cache.slots)
        width = bucket(min(longest, self.cache.length), length_buckets(self.cache.length))
        key = (b, width, sampling, adapters)
        if self.use_graphs and self.graph_failure is None:
            graph = self.graphs.get(key) or self._capture(key)
            if graph is not None:
                graph.replay()
                return self._send(self.out_tokens[:b], self.out_finished[:b], rows)
        self._decode_step(b, width, sampling, adapters)
        return self._send(self.out_tokens[:b], self.out_finished[:b], rows)

    def _decode_step(self, b: int, width: int, sampling: bool, adapters: bool = False) -> None:
        """The step itself: pure device work on fixed shapes (what a CUDA graph captures)."""
        import torch

        act = self.active[:b]
        pos = self.pos[:b]
        write = torch.where(act, pos, torch.full_like(pos, self.scratch))
        seen = torch.where(act, pos + 1, torch.ones_like(pos))
        mask = (torch.arange(width, device=self.device)[None, :] < seen[:, None])[:, None, None, :]
        ctx = StepContext(self.cache, "decode", write_pos=write, kv_mask=mask)
        with engine_forward(self.model, ctx), self._lora(self.adapter[:b] if adapters else None):
            logits = self._forward(self.tokens[:b, None], write[:, None])
        presence = self.presence[:b] if (sampling and self.presence is not None) else None
        new = next_tokens(logits, self._rows(torch.arange(b, device=self.device)), presence, sampling=sampling)
        new = torch.where(act, new, self.tokens[:b])
        self.tokens[:b] = new
        self.pos[:b] = pos + act
        self.answer_len[:b] += act
        if self.presence is not None:
            rows = torch.arange(b, device=self.device)
            self.presence[rows, new] |= act
        done = act & is_stop(new, self.stop_ids, self.answer_len[:b], self.max_new[:b])
        self.active[:b] = act & ~done
        self.out_tokens[:b] = new
        self.out_finished[:b] = done

    def _logits(self, input_ids, position_ids, keep):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          logits_to_keep=keep).logits

    def _forward(self, input_ids, position_ids):
        """The decode forward's last logits: its layers compiled when asked (and they compile), else eager."""
        if self.compiled is not None and self.compile_failure is None:
            try:
                with _layers_through(self.layers, self.compiled):
                    return self._logits(input_ids, position_ids, 1)[:, -1]
            except Exception as e:  # noqa: BLE001 - any compile failure means: the eager forward
                self.compile_failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return self._logits(input_ids, position_ids, 1)[:, -1]

    def capture_buckets(self, max_rows: int, widths) -> None:
        """Capture the greedy decode steps (base rows only, and with adapters when some are loaded) of
        every batch bucket up to ``max_rows`` at these widths."""
        import torch

        if not self.use_graphs:
            return
        with self.lock, torch.inference_mode():
            for b in BATCH_BUCKETS:
                for w in widths:
                    for adapters in (False, True) if self.lora is not None else (False,):
                        key = (min(b, self.cache.slots), min(w, self.cache.length), False, adapters)
                        if self.graph_failure is None and key not in self.graphs:
                            self._capture(key)
                if b >= max_rows:
                    break
            if self.prefill_graphs is not None:
                self.prefill_graphs.capture_all(self.lora is not None)

    def _capture(self, key: tuple):
        """Capture the decode step for ``key`` = (rows, width, sampling) as a CUDA graph; a failure
        turns graphs off for this engine (eager steps from then on, the reason kept for the log)."""
        import torch

        b, width, sampling, adapters = key
        saved = self.active[:b].clone()
        self.active[:b] = False  # warm-up and capture must not advance real requests
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_step(b, width, sampling, adapters)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
                self._decode_step(b, width, sampling, adapters)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            self.graph_failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            graph = None
        finally:
            self.active[:b] = saved
        if graph is not None:
            self.graphs[key] = graph
        return graph

    # -- results ----------------------------------------------------------------------------------
    def _pinned(self, n: int):
        import torch

        pin = str(self.device).startswith("cuda")
        return (torch.zeros(n, dtype=torch.long, pin_memory=pin), torch.zeros(n, dtype=torch.bool, pin_memory=pin))

    def _send(self, tokens, finished, rows: list) -> Pending:
        """Copy a step's (tokens, finished) to host memory without waiting for the device."""
        import torch

        host_tokens, host_finished = self._host[self._flip]
        self._flip = (self._flip + 1) % len(self._host)
        n = tokens.shape[0]
        host_tokens[:n].copy_(tokens, non_blocking=True)
        host_finished[:n].copy_(finished, non_blocking=True)
        event = None
        if str(self.device).startswith("cuda"):
            event = torch.cuda.Event()
            event.record()
        return Pending(host_tokens, host_finished, event, list(rows))

    def _lora(self, selection):
        import contextlib

        if self.lora is None or selection is None:
            return contextlib.nullcontext()
        return self.lora.select(selection)


def _finishing(logits, finishing: list, slots, ends_t) -> tuple:
    """A prefill forward's result: the kept logits of the chunks that end their prompts, their slots and
    prompt ends (the last two None when no chunk ends its prompt)."""
    if not finishing:
        return logits, None, None
    return logits[: len(finishing)], slots, ends_t


def _layer_forward(layer, *args, **kwargs):
    """One decoder layer's own forward (what the runner compiles once for every layer)."""
    return type(layer).forward(layer, *args, **kwargs)


@contextlib.contextmanager
def _layers_through(layers, fn):
    """Inside: calling decoder layer ``l`` runs ``fn(l, ...)`` (an instance ``forward``, removed after)."""
    for layer in layers:
        layer.forward = functools.partial(fn, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _accumulate(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def _varlen_ok() -> bool:
    from glmtune.models.speed import varlen_available

    return varlen_available()
