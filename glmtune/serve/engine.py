"""The serving engine: one worker thread runs generation, fed by a bounded queue.

Why one thread: the model (and peft's active adapter) is shared state, and on one device requests
run one after another anyway; keeping generation off the event loop lets uvicorn keep accepting,
validating and rejecting requests (429) while a long answer is produced.

Each :class:`Job` carries a ``cancel`` event: a request that times out or whose client disconnects
sets it, and the worker skips the job (still queued) or stops generating at the next token.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

log = logging.getLogger("glmtune.serve")


class QueueFull(Exception):
    """More requests are waiting than ``max_queue``: the client should retry later (HTTP 429)."""


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None
    gen: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", piece) ... then ("done", (text, Output)) or ("error", exc)
    stream: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value) -> None:
        """Thread-safe hand-over to the request's coroutine on the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # loop closed: the server is shutting down
            self.cancel.set()


class Engine:
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
