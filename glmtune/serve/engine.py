"""The serving engines: how requests become generations.

``BatchingEngine`` (the HF back-end): transformers' continuous batching
(``model.init_continuous_batching`` -> ``ContinuousBatchingManager``). Every request in flight joins
the same forward steps as soon as it arrives, and one that ends or is cancelled leaves at the next
step, so 64 clients cost little more wall time than 8 and an abandoned request frees its place
within one token. transformers owns the scheduler, the paged KV cache and the sampling; this
module only maps requests to it (stop ids, per-request temperature / top_p / top_k, adapters,
cancellation) and results back to the requests' events.

``Engine`` (back-ends without an incremental batching API, e.g. vLLM's offline ``LLM``, and
stand-ins in tests): one worker thread runs ``predictor.generate_stream``, fed by a bounded queue.

Both take :class:`Job` s. A job's ``stop()`` (timeout, client gone) ends its generation at the next
token; the request's coroutine gets ("text", piece)... then ("done", (text, Output)) or ("error", exc).
"""
from __future__ import annotations

import asyncio
import logging
import queue
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

    def stop(self) -> None:
        """The request is over for its client (answered, timed out, disconnected): stop generating."""
        if not self.cancel.is_set():
            self.cancel.set()
            if self.on_stop is not None:
                self.on_stop()


def make_engine(predictor, max_queue: int = 64):
    """BatchingEngine where the back-end is transformers (HF) with continuous batching, else the
    one-worker Engine."""
    from glmtune.infer.backends import HFBackend

    if getattr(predictor, "vision", None) is not None:
        # continuous batching takes token ids only: a picture's pixel values would never reach the model
        log.warning("vision-language model: serving one request at a time (continuous batching is text-only)")
        return Engine(predictor, max_queue=max_queue)
    if isinstance(getattr(predictor, "backend", None), HFBackend) and _has_continuous_batching():
        return BatchingEngine(predictor, max_queue=max_queue)
    log.warning("this back-end / transformers version cannot batch requests: serving one at a time")
    return Engine(predictor, max_queue=max_queue)


def _has_continuous_batching() -> bool:
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError:
        return False
    # the per-request result callbacks this engine relies on (transformers 5.x)
    return hasattr(ContinuousBatchingManager, "register_result_handler")


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
    """Continuous batching through transformers' ContinuousBatchingManager (see the module docstring).

    Two managers at most, made on first use: greedy (the default, reproducible) and sampling
    (per-request temperature / top_p / top_k). A request's adapter is switched in while no other
    request of another adapter is in flight: peft's active adapter is model state shared by every
    row of a batch, so requests for different adapters take turns, each turn batched.
    """

    def __init__(self, predictor, max_queue: int = 64):
        from glmtune.infer.backends import BASE

        self.predictor = predictor
        self.backend = predictor.backend
        self.max_queue = max_queue
        self._managers: dict[bool, object] = {}
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # request id -> job, for every request in flight
        self._active = BASE if not self.backend.adapters else None  # adapter the model runs now
        self._waiting: list[tuple[Job, str]] = []  # jobs for another adapter, FIFO
        self._counter = 0

    @property
    def waiting(self) -> int:
        return len(self._jobs) + len(self._waiting)

    def submit(self, job: Job) -> None:
        from glmtune.infer.backends import BASE

        adapter = BASE if job.adapter is None else job.adapter
        if adapter != BASE and adapter not in self.backend.adapters:  # a 400 now, not a failure later
            from glmtune.errors import InputError
            raise InputError(f"no adapter named '{adapter}' is loaded", field="model",
                             fix=f"use one of {', '.join([BASE] + self.backend.adapters)}")
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests in flight); retry later")
            if self._active is None or (adapter == self._active) or not (self._jobs or self._waiting):
                self._start(job, adapter)
            else:
                self._waiting.append((job, adapter))
                job.on_stop = lambda: self._drop_waiting(job)

    def close(self) -> None:
        for manager in self._managers.values():
            manager.stop(block=True, timeout=10)

    # -- adapters -----------------------------------------------------------------------------------
    def _start(self, job: Job, adapter: str) -> None:
        """Run ``job`` now (lock held): switch the model to its adapter if no request is in flight."""
        if adapter != self._active:
            self._switch_adapter(adapter)
        self._counter += 1
        rid = f"glmtune-{self._counter}"
        gen = self.predictor.gen_config(job.gen)
        manager = self._manager(sample=not gen.greedy)
        self._jobs[rid] = job
        decoder = _Decoder(self.predictor, job, gen.max_new_tokens)
        job.on_stop = lambda: self._cancel(manager, rid)
        kwargs = {} if gen.greedy else {"temperature": float(gen.temperature), "top_p": float(gen.top_p),
                                        "top_k": int(gen.top_k or self._vocab_size())}
        manager.register_result_handler(rid, lambda out: self._on_result(rid, decoder, out))
        manager.add_request(job.prompt_ids, request_id=rid, max_new_tokens=gen.max_new_tokens,
                            streaming=True, eos_token_id=list(self.predictor.stop_ids), **kwargs)

    def _switch_adapter(self, adapter: str) -> None:
        """Make ``adapter`` the model's active one; only called with nothing in flight."""
        from glmtune.infer.backends import BASE

        model = self.backend.model
        if self.backend.adapters:
            if adapter == BASE:
                model.base_model.disable_adapter_layers()
            else:
                model.base_model.enable_adapter_layers()
                model.set_adapter(adapter)
        self._active = adapter

    def _cancel(self, manager, rid: str) -> None:
        """Free a running request's place: transformers drops it before the next step (and sends
        nothing more for it), so it leaves the in-flight set here."""
        with self._lock:
            if self._jobs.pop(rid, None) is None:
                return  # already finished
            manager.cancel_request(rid)
            # transformers drops its result handler only when a request finishes, which a cancelled one
            # never does: drop it here. No public call does it; one dict.pop is atomic, so the router's
            # lock (held only around single dict reads and writes) is not needed.
            manager.output_router.result_handlers.pop(rid, None)
            self._next_turn()

    def _drop_waiting(self, job: Job) -> None:
        with self._lock:
            self._waiting = [(j, a) for j, a in self._waiting if j is not job]
            self._next_turn()

    def _next_turn(self) -> None:
        """With nothing in flight, start every waiting job of the first waiting adapter (lock held)."""
        if self._jobs or not self._waiting:
            return
        adapter = self._waiting[0][1]
        now = [j for j, a in self._waiting if a == adapter]
        self._waiting = [(j, a) for j, a in self._waiting if a != adapter]
        for job in now:
            self._start(job, adapter)

    # -- results (called on the event loop by transformers' output router) ---------------------------
    def _on_result(self, rid: str, decoder: "_Decoder", out) -> None:
        job = self._jobs.get(rid)
        if job is None:
            return
        try:
            finished = decoder.feed(out)
        except Exception as e:  # report to that request; the engine lives on
            log.exception("decoding failed")
            job.send("error", e)
            finished = True
        if finished:
            with self._lock:
                self._jobs.pop(rid, None)
                self._next_turn()

    # -- managers -----------------------------------------------------------------------------------
    def _manager(self, sample: bool):
        if sample not in self._managers:
            self._managers[sample] = self._make_manager(sample)
        return self._managers[sample]

    def _make_manager(self, sample: bool):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        model = self.backend.model
        stop_ids = list(self.predictor.stop_ids)
        # Sampling processors exist only when the config asks for them; the values here are
        # placeholders that each request overrides (per_request_processors).
        gen_config = (GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50, eos_token_id=stop_ids)
                      if sample else GenerationConfig(do_sample=False, eos_token_id=stop_ids))
        gen_config.pad_token_id = self.backend.pad_id(stop_ids)
        on_gpu = str(self.backend.device).startswith("cuda")
        # On a GPU transformers sizes the paged cache from free memory. On a CPU it would take a
        # GPU-sized guess, and each step's attention mask spans the whole cache: give it 256 token
        # slots per allowed request in 32-token pages (a longer answer takes the pages others leave).
        cpu = {"page_size": 32, "num_blocks": max(64, self.max_queue * 8), "max_batch_tokens": 2048,
               "use_cuda_graph": False}
        cb_config = ContinuousBatchingConfig(per_request_processors=sample, auto_switch_to_flash=on_gpu,
                                             max_queue_size=0, **({} if on_gpu else cpu))
        manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
        manager.start()
        return manager

    def _vocab_size(self) -> int:
        return int(self.backend.model.config.get_text_config().vocab_size)


class _Decoder:
    """One request's growing token ids -> text pieces (streamed jobs) and the final (text, Output)."""

    def __init__(self, predictor, job: Job, max_new_tokens: int):
        from glmtune.infer.predictor import StreamDecoder

        self.p, self.job, self.max_new = predictor, job, max_new_tokens
        self.stream = StreamDecoder(predictor) if job.stream else None

    def feed(self, out) -> bool:
        """Handle one GenerationOutput; True once the request is over."""
        from glmtune.infer.backends import Output, cut_at_stop

        tokens = list(out.generated_tokens)
        if self.stream is not None and tokens:
            piece = self.stream.update(tokens)
            if piece:
                self.job.send("text", piece)
        if not out.is_finished():
            return False
        if out.error is not None:
            self.job.send("error", RuntimeError(out.error))
            return True
        result = cut_at_stop(tokens, self.p.stop_ids, self.job.cancel.is_set())
        if result.finish_reason != "stop" and len(tokens) < self.max_new:
            result = Output(result.token_ids, "cancelled")
        text = self.p.decode(result.token_ids)
        if self.stream is not None:
            piece = self.stream.finish(text)
            if piece:
                self.job.send("text", piece)
        self.job.send("done", (text, result))
        return True
