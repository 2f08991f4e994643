"""The serving engines: how requests become generations.

``BatchingEngine`` (the HF back-end): glmtune's generation engine (:mod:`glmtune.infer.engine`).
Every request in flight joins the same decode steps as soon as it arrives, whatever adapter it
names, and one that ends, times out or is cancelled frees its slot at the next step. The engine's
thread owns the model; this module maps requests to it and its tokens back to the requests'
events, decoding text on the event loop (never on the engine's thread).

``Engine`` (back-ends without an incremental batching API, e.g. vLLM's offline ``LLM``, and
stand-ins in tests): one worker thread runs ``predictor.generate_stream``, fed by a bounded queue.

Both take :class:`Job` s. A job's ``stop()`` (timeout, client gone) ends its generation at the next
token; the request's coroutine gets ("text", piece)... then ("done", (text, Output)) or ("error", exc).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("glmtune.serve")


class QueueFull(Exception):
    """More requests are in the server than ``max_queue``: the client should retry later (HTTP 429)."""


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    gen: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", piece) ... then ("done", (text, Output)) or ("error", exc)
    stream: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    on_stop: Callable[[], None] | None = None  # set by the engine that runs the job

    def send(self, kind: str, value) -> None:
        """Thread-safe hand-over to the request's coroutine on the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # loop closed: the server is shutting down
            self.stop()

    def put(self, kind: str, value) -> None:
        """The same hand-over, from the event loop's own thread (no wake-up of the loop needed)."""
        self.events.put_nowait((kind, value))

    def stop(self) -> None:
        """The request is over for its client (answered, timed out, disconnected): stop generating."""
        if not self.cancel.is_set():
            self.cancel.set()
            if self.on_stop is not None:
                self.on_stop()


def make_engine(predictor, max_queue: int = 64):
    """BatchingEngine where the back-end runs glmtune's generation engine, else the one-worker Engine."""
    backend = getattr(predictor, "backend", None)
    if getattr(predictor, "vision", None) is not None:
        # the engine takes token ids only: a picture's pixel values would never reach the model
        log.warning("vision-language model: serving one request at a time (the batching engine is text-only)")
        return Engine(predictor, max_queue=max_queue)
    problem = getattr(backend, "engine_problem", "this back-end has no batching engine")
    if problem is None:
        return BatchingEngine(predictor, max_queue=max_queue)
    log.warning("serving one request at a time: %s", problem)
    return Engine(predictor, max_queue=max_queue)


class Engine:
    """One worker thread, one request at a time (back-ends that cannot join requests mid-flight)."""

    def __init__(self, predictor, max_queue: int = 64):
        self.predictor = predictor
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, daemon=True, name="glmtune-engine")
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy ({self.max_queue} requests waiting); retry later") from None

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._jobs.put(None)  # blocks only if full, and then the worker is draining it

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                continue  # its client has gone or timed out while it waited
            try:
                on_text = (lambda piece: job.send("text", piece)) if job.stream else (lambda piece: None)
                result = self.predictor.generate_stream(job.prompt_ids, on_text, adapter=job.adapter,
                                                        cancel=job.cancel, **job.gen)
                job.send("done", result)
            except Exception as e:  # report to that request; the worker lives on
                log.exception("generation failed")
                job.send("error", e)


class BatchingEngine:
    """Requests of every adapter batched together by the back-end's generation engine.

    The engine's thread only appends a finished step's requests to ``_dirty`` and wakes the event
    loop once; the loop turns their tokens into text pieces and events (so 64 streams cost the
    engine one wake-up per step, not 64 calls)."""

    def __init__(self, predictor, max_queue: int = 64):
        self.predictor = predictor
        self.backend = predictor.backend
        self.max_queue = max_queue
        self.engine = self.backend.engine(list(predictor.stop_ids))
        # The engine's thread needs the GIL for a moment every step; the event loop (HTTP, text
        # decoding) must hand it over within 1 ms, not Python's default 5 ms (a whole decode step).
        sys.setswitchinterval(0.001)
        self.engine.warmup()  # capture decode graphs before the first client waits on them
        self._in_flight: dict[int, tuple] = {}   # id(seq) -> (job, decoder)
        self._dirty: list = []
        self._dirty_lock = threading.Lock()
        self._wake_scheduled = False

    @property
    def waiting(self) -> int:
        return len(self._in_flight)

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def last_error(self) -> str | None:
        """The last error a shared engine step raised (its requests failed; the loop went on)."""
        return self.engine.error

    @property
    def max_positions(self) -> int:
        """Prompt + answer tokens one request may have."""
        return self.engine.max_positions

    def submit(self, job: Job) -> None:
        index = self.backend.adapter_index(job.adapter)  # an unknown adapter is a 400 now
        gen = self.predictor.gen_config(job.gen)
        if len(self._in_flight) >= self.max_queue:
            raise QueueFull(f"the server is busy ({self.max_queue} requests in flight); retry later")
        decoder = _Decoder(self.predictor, job)
        seq = self.engine.submit(job.prompt_ids, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                 top_p=gen.top_p, top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                                 seed=gen.seed, adapter=index, cancel=job.cancel,
                                 on_update=lambda s: self._mark(job.loop, s))
        self._in_flight[id(seq)] = (job, decoder)

    def close(self) -> None:
        """Stop this server's requests; the engine belongs to the predictor, which may serve on."""
        for job, _ in list(self._in_flight.values()):
            job.stop()

    def _mark(self, loop, seq) -> None:
        """On the engine's thread: note ``seq`` changed; wake the event loop once per batch of changes."""
        with self._dirty_lock:
            self._dirty.append(seq)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _drain(self) -> None:
        """On the event loop: hand every changed request its new text, or its end."""
        with self._dirty_lock:
            dirty, self._dirty, self._wake_scheduled = self._dirty, [], False
        for seq in dict.fromkeys(dirty):
            entry = self._in_flight.get(id(seq))
            if entry is None:
                continue
            job, decoder = entry
            try:
                finished = decoder.feed(seq)
            except Exception as e:  # report to that request; the others go on
                log.exception("decoding failed")
                job.put("error", e)
                finished = True
            if finished:
                self._in_flight.pop(id(seq), None)


class _Decoder:
    """One request's growing token ids -> text pieces (streamed jobs) and the final (text, Output)."""

    def __init__(self, predictor, job: Job):
        from glmtune.infer.predictor import StreamDecoder

        self.p, self.job = predictor, job
        self.stream = StreamDecoder(predictor) if job.stream else None

    def feed(self, seq) -> bool:
        """Handle the request's state now; True once it is over."""
        from glmtune.infer.backends import engine_output

        if self.stream is not None and seq.tokens:
            piece = self.stream.update(list(seq.tokens))
            if piece:
                self.job.put("text", piece)
        if seq.finish_reason is None:
            return False
        if seq.error is not None:
            self.job.put("error", seq.error)
            return True
        result = engine_output(seq)
        text = self.p.decode(result.token_ids)
        if self.stream is not None:
            piece = self.stream.finish(text)
            if piece:
                self.job.put("text", piece)
        self.job.put("done", (text, result))
        return True
