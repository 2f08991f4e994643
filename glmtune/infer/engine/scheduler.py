"""The generation engine: requests in, tokens out, continuously batched on one model.

One thread owns the model. Each turn of its loop: drop cancelled requests and free their slots
(the last running request moves into the hole, so running requests fill slots 0..n-1); give free
slots to waiting requests (copying a cached prompt prefix when one matches); run one prefill forward
over at most ``prefill_tokens`` prompt tokens (chunks of long prompts, so they never stall the
others); run one decode step for every decoding request; then hand the previous step's tokens to
their requests while the device runs this one. A request that fails alone fails alone; an error
in a step everyone shares fails the requests in it, and the loop lives on.

Requests are served first come, first served; a request waits (it is not refused) while every
slot is taken, so the KV cache never runs the device out of memory.
"""
from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

from glmtune.errors import InputError
from glmtune.infer.engine.cache import PREFIX_BLOCK, PrefixStore
from glmtune.infer.engine.runner import ModelRunner

log = logging.getLogger("glmtune.engine")

# Engines still running when the interpreter exits are stopped first: a daemon thread still inside
# a CUDA call while Python tears down aborts the process ("terminate called without an active exception").
_RUNNING: "weakref.WeakSet[GenerationEngine]"


def _close_all() -> None:
    for engine in list(_RUNNING):
        engine.close()


@dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    """One request: its prompt, settings, progress and answer."""
    prompt: list[int]
    temperature: float
    top_p: float
    top_k: int
    penalty: float
    seed: int
    max_new: int
    adapter: int
    on_update: Callable[["Sequence"], None] | None = None
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None   # stop | length | cancelled | error
    error: BaseException | None = None
    slot: int | None = None
    prefilled: int = 0
    length: int = 0                    # cache positions written once every launched step has run
    decoding: bool = False
    hashes: list[int] = field(default_factory=list)
    store_prefix: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0 or self.penalty != 1.0

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class GenerationEngine:
    """Continuous batching over a :class:`ModelRunner` (see the module docstring)."""

    def __init__(self, runner: ModelRunner, *, prefill_tokens: int, prefix_slots: int, stop_ids: list[int]):
        self.runner = runner
        self.prefill_tokens = prefill_tokens
        slots = runner.cache.slots
        self.max_running = slots - prefix_slots
        self.prefix = PrefixStore(list(range(self.max_running, slots))) if prefix_slots else None
        self.stop_ids = set(stop_ids)
        self.max_positions = runner.cache.length - 1   # prompt + answer (the last position is scratch)
        self._incoming: queue.Queue = queue.Queue()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []      # index = slot
        self._pending: list = []
        self._wake = threading.Event()
        self._closed = False
        self.steps = 0
        self.error: str | None = None           # the last error a step raised
        self._thread = threading.Thread(target=self._loop, daemon=True, name="glmtune-generation")
        self._thread.start()
        _RUNNING.add(self)

    # -- the public side ----------------------------------------------------------------------------
    def submit(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None, adapter: int = -1,
               on_update=None, cancel: threading.Event | None = None) -> Sequence:
        """Queue a request; ``on_update(seq)`` runs on the engine thread after new tokens and at the end."""
        if self._closed:
            raise RuntimeError("the generation engine is closed")
        if not prompt:
            raise InputError("the prompt is empty", field="prompt")
        room = self.max_positions - len(prompt)
        if room < 1:
            raise InputError(f"the prompt is {len(prompt)} tokens; the engine holds {self.max_positions} "
                             f"(prompt + answer)", field="prompt",
                             fix="shorten the prompt, or raise max_model_len")
        seq = Sequence(list(prompt), float(temperature), float(top_p), int(top_k or 0), float(repetition_penalty),
                       random.getrandbits(31) if seed is None else int(seed), min(int(max_new_tokens), room),
                       adapter, on_update, cancel)
        self._incoming.put(seq)
        self._wake.set()
        return seq

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def graphs_note(self) -> str:
        """Whether decode steps replay CUDA graphs and run compiled, for the log (a failure says why)."""
        r = self.runner
        compiled = ""
        if r.compile_failure is not None:
            compiled = f"; torch.compile failed ({r.compile_failure}): the decode forward runs eagerly"
        elif r.compiled is not None:
            compiled = "; the decode forward is compiled"
        if r.regions is not None:
            compiled += (f"; prefill regions failed to compile ({r.regions.failure}): the prefill runs eagerly"
                         if r.regions.failure else "; the prefill's norms, MLP and rotary are compiled")
        g = r.prefill_graphs
        if g is not None and r.use_graphs:
            compiled += (f"; prefill graph capture failed ({g.failure}): the prefill runs eagerly" if g.failure
                         else f"; {len(g.graphs)} prefill graphs captured")
        if not r.use_graphs:
            return "decode steps run eagerly" + compiled
        if r.graph_failure is not None:
            return f"CUDA graph capture failed ({r.graph_failure}): decode steps run eagerly" + compiled
        return f"{len(r.graphs)} decode graphs captured" + compiled

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting) + self._incoming.qsize(),
                "slots": self.max_running, "steps": self.steps}

    def warmup(self, widths=(128, 256, 512), timeout: float = 600) -> int:
        """Capture the decode graphs of every batch bucket at these attention widths now (on the
        engine's thread), so the first requests do not wait for captures; returns how many exist."""
        done = threading.Event()

        def task():
            try:
                self.runner.capture_buckets(self.max_running, widths)
            finally:
                done.set()

        self._incoming.put(task)
        self._wake.set()
        done.wait(timeout)
        return len(self.runner.graphs)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.runner.cache.detach()  # the model lets go of the KV cache (its memory is freed with the engine)
        _RUNNING.discard(self)

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        device = self.runner.cache.device
        if str(device).startswith("cuda"):
            import torch

            # CUDA's current device is per thread: without this, this thread's streams, events and graph
            # pool would be cuda:0's while the model sits on cuda:N (serve --device cuda:1, a rank > 0)
            torch.cuda.set_device(device)
        while not self._closed:
            self._take_incoming()
            if not (self._running or self._waiting or self._pending):
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 - a step everyone shares failed: they fail, the loop lives
                log.exception("generation step failed")
                self.error = f"{type(e).__name__}: {e}"
                self._fail_all(e)
        for seq in self._running + self._waiting:
            self._finish(seq, "cancelled")

    def _turn(self) -> None:
        while len(self._pending) > 1:   # keep at most one step in flight before launching more
            self._process(self._pending.pop(0))
        self._release_finished()
        self._admit()
        prefill = self._prefill()
        if prefill is not None:
            self._pending.append(prefill)
        decoding = [s if s.decoding and s.finish_reason is None else None for s in self._running]
        if any(decoding):
            longest = max(s.length + 1 for s in decoding if s is not None)
            sampling = any(s.sampling for s in decoding if s is not None)
            adapters = any(s.adapter >= 0 for s in decoding if s is not None)
            last = max(i for i, s in enumerate(decoding) if s is not None) + 1
            self._pending.append(self.runner.decode(last, longest, sampling=sampling, adapters=adapters,
                                                    rows=decoding[:last]))
            for s in decoding:
                if s is not None:
                    s.length += 1
            self.steps += 1
        if self._pending and (len(self._pending) > 1 or not any(decoding)):
            self._process(self._pending.pop(0))

    def _take_incoming(self) -> None:
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if callable(item):  # a task for this thread (warmup)
                item()
            else:
                self._waiting.append(item)

    def _release_finished(self) -> None:
        """Free the slots of finished and cancelled requests; the last running one fills each hole."""
        for seq in list(self._waiting):
            if seq.cancelled:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            if seq.cancelled and seq.finish_reason is None:
                self._finish(seq, "cancelled")
            if seq.finish_reason is None:
                i += 1
                continue
            last = self._running.pop()
            if last is seq:
                self.runner.deactivate(i)
            else:
                self.runner.move(last.slot, i, last.length)
                last.slot = i
                self._running[i] = last

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_running:
            seq = self._waiting.pop(0)
            slot = len(self._running)
            seq.slot = slot
            self.runner.set_row(slot, temperature=seq.temperature, top_p=seq.top_p, top_k=seq.top_k,
                                penalty=seq.penalty, seed=seq.seed, max_new=seq.max_new, adapter=seq.adapter)
            if seq.penalty != 1.0:
                self.runner.mark_seen(slot, seq.prompt)
            if self.prefix is not None:
                seq.hashes = self.prefix.block_hashes(seq.prompt, seq.adapter)
                hit = self.prefix.lookup(seq.hashes)
                seq.store_prefix = self.prefix.note(seq.hashes)
                if hit is not None:
                    self.runner.cache.copy(hit[0], slot, hit[1])
                    seq.prefilled = seq.length = hit[1]
                if seq.store_prefix <= seq.prefilled:
                    seq.store_prefix = 0
            self._running.append(seq)

    def _prefill(self):
        budget, chunks, seqs = self.prefill_tokens, [], []
        for seq in self._running:
            if budget <= 0:
                break
            if seq.decoding or seq.finish_reason is not None:
                continue
            n = min(len(seq.prompt) - seq.prefilled, budget)
            last = seq.prefilled + n == len(seq.prompt)
            chunks.append((seq.slot, seq.prompt[seq.prefilled:seq.prefilled + n], seq.prefilled, last))
            seqs.append((seq, n, last))
            budget -= n
        if not chunks:
            return None
        finishing = [seq for seq, _, last in seqs if last]
        sampling = any(s.sampling for s in finishing)
        try:
            pending = self.runner.prefill(chunks, sampling=sampling, rows=finishing)
        except Exception as e:  # noqa: BLE001 - these requests fail; the others go on
            log.exception("prefill failed")
            self.error = f"{type(e).__name__}: {e}"
            for seq, _, _ in seqs:
                self._finish(seq, "error", e)
            return None
        for seq, n, last in seqs:
            seq.prefilled += n
            seq.length = seq.prefilled
            seq.decoding = last
            if seq.store_prefix and seq.prefilled >= seq.store_prefix:
                length = seq.store_prefix
                slot = self.prefix.place(seq.hashes[length // PREFIX_BLOCK - 1], length)
                self.runner.cache.copy(seq.slot, slot, length)
                seq.store_prefix = 0
        return pending

    def _process(self, pending) -> None:
        """Hand one step's tokens to their requests (waits for that step only)."""
        if pending is None:
            return
        if pending.event is not None:
            pending.event.synchronize()
        tokens, finished = pending.tokens.tolist(), pending.finished.tolist()
        for i, seq in enumerate(pending.rows):
            if seq is None or seq.finish_reason is not None:
                continue
            tok = tokens[i]
            seq.tokens.append(tok)
            if finished[i]:
                self._finish(seq, "stop" if tok in self.stop_ids else "length")
            else:
                self._notify(seq)

    def _notify(self, seq: Sequence) -> None:
        if seq.on_update is None:
            return
        try:
            seq.on_update(seq)
        except Exception as e:  # noqa: BLE001 - the consumer of one request failed: only it ends
            log.exception("a request's consumer failed")
            seq.error, seq.finish_reason = e, "error"
            seq.done.set()

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.error = reason, error
        self._notify(seq)
        seq.done.set()

    def _fail_all(self, error: BaseException) -> None:
        self._pending.clear()
        for seq in self._running:
            self._finish(seq, "error", error)
        for i in range(len(self._running)):
            self.runner.deactivate(i)
        self._running.clear()



_RUNNING = weakref.WeakSet()
atexit.register(_close_all)
