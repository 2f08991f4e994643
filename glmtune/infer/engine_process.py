"""The generation engine in a process of its own: the model, its adapters and the decode loop in a
child process; tokenizer, template, HTTP and text in the caller's (`glmtune serve` on a GPU).

Why: in one process the serving side's Python (HTTP parsing, the text of every stream, SSE writes)
and the engine's decode loop share one interpreter lock. On the H200 (session 7) the engine alone
ran 64 requests at 5,621 tok/s, through `glmtune serve` in the same process 3,001: the device waited
on the lock. vLLM and SGLang split the same way (an engine core process, an API server process);
this is the smallest version of that split, over a ``multiprocessing`` pipe (nothing to install).

    backend = ProcessBackend(model_dir, tokenizer, adapters, engine={...})   # spawns, loads there
    engine = backend.engine(stop_ids)      # starts the child's engine (graphs captured there)
    seq = engine.submit(prompt_ids, max_new_tokens=64, on_update=..., cancel=event)

``RemoteEngine`` has the interface of :class:`glmtune.infer.engine.GenerationEngine` that its
users read (``submit`` returning a sequence with ``tokens`` / ``finish_reason`` / ``error`` / ``done``,
``alive``, ``error``, ``max_positions``, ``warmup``, ``close``), so ``serve.engine.BatchingEngine``
and ``generate_on_engine`` run on either unchanged.

Messages (pickled, one pipe each way):
  parent -> child: ("start", stop_ids) | ("submit", rid, prompt, settings) | ("cancel", rid) | ("close",)
  child -> parent: ("loaded", info) | ("started", info) | ("failed", text) |
                   ("steps", [(rid, new_ids, finish_reason, error), ...])  one message per engine step
A request's cancel event is checked by the parent's receiver every message and every 20 ms, and
sent on; the child's engine frees the slot at its next step. If the child dies, every request in
flight fails with the reason and ``alive`` turns False (``/health`` answers 503).
"""
from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.errors import GlmtuneError, InputError

log = logging.getLogger("glmtune.infer")

CANCEL_POLL = 0.02  # seconds between the parent's checks of cancel events while no step arrives


class EngineProcessError(GlmtuneError):
    """The engine's process failed to start or stopped."""


@dataclass(eq=False)
class RemoteSequence:
    """One request as the parent sees it: ids arrive from the child's steps."""
    rid: int
    on_update: object = None
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel_sent: bool = False


def error_info(e: BaseException) -> tuple:
    """An exception as plain data for the pipe: (kind, problem, field, fix); kind "input" for an
    InputError (a 400 for its request), else the class name."""
    if isinstance(e, InputError):
        return "input", e.problem, e.field, e.fix
    return type(e).__name__, str(e), None, None


def error_from(info: tuple) -> BaseException:
    """The inverse of :func:`error_info` in the parent: the exception the serving side maps to a status."""
    kind, problem, where, fix = info
    if kind == "input":
        return InputError(problem, field=where, fix=fix)
    return EngineProcessError(f"{kind}: {problem}")


class ProcessBackend:
    """The HF back-end with its model in a child process (serving only: no scoring, no fallback)."""

    name = "hf-process"

    def __init__(self, model_dir: str | Path, tokenizer, adapters: dict[str, Path], *, device: str | None = None,
                 dtype: str = "auto", liger: str = "none", engine=None, start_timeout: float = 3600.0):
        import multiprocessing as mp

        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir)
        spec = {"model_dir": str(model_dir), "adapters": {n: str(p) for n, p in adapters.items()},
                "device": device, "dtype": dtype, "liger": liger, "engine": engine}
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._conn, child = ctx.Pipe()
        # not a daemon: a daemonic process may not start processes of its own (inductor's compile
        # workers); the child ends by itself when this side's pipe closes (EOF), and close() at exit
        self._process = ctx.Process(target=child_main, args=(child, spec), daemon=False, name="glmtune-engine")
        self._process.start()
        child.close()
        atexit.register(self.close)
        self.start_timeout = start_timeout
        info = self._expect("loaded")
        self.adapters = list(info["adapters"])
        self._index = dict(info["index"])
        self.engine_problem = info["engine_problem"]
        self.context_length = info["context_length"]
        self.device = info["device"]
        self._engine: RemoteEngine | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._process.pid

    def _expect(self, kind: str) -> dict:
        """The child's next message, which must be ``kind``; its failure or death is an error here."""
        if not self._conn.poll(self.start_timeout):
            self._process.kill()
            raise EngineProcessError(f"the engine process sent nothing in {self.start_timeout:g} s")
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineProcessError(f"the engine process exited (code {self._process.exitcode}) before "
                                     f"it was {kind}; its error is above") from None
        if message[0] == "failed":
            self._process.join(5)
            raise EngineProcessError(f"the engine process failed: {message[1]}")
        if message[0] != kind:
            raise EngineProcessError(f"the engine process sent {message[0]!r}, expected {kind!r}")
        return message[1]

    def engine(self, stop_ids: list[int]) -> "RemoteEngine":
        from glmtune.infer.backends import check_stop_ids

        with self._lock:
            if self._engine is None:
                if self.engine_problem is not None:
                    raise EngineProcessError(f"glmtune's engine cannot run this model: {self.engine_problem}")
                self._conn.send(("start", list(stop_ids)))
                info = self._expect("started")
                self._engine = RemoteEngine(self._conn, self._process, info)
                log.info(self._engine.summary)
            else:
                check_stop_ids(self._engine, stop_ids)
        return self._engine

    @property
    def engine_summary(self) -> str | None:
        if self.engine_problem is not None:
            return f"glmtune's engine is off: {self.engine_problem}"
        if self._engine is None:
            return None
        return f"{self._engine.summary}; in its own process (pid {self._process.pid})"

    def adapter_index(self, adapter: str | None) -> int:
        from glmtune.infer.backends import BASE, no_such_adapter

        if adapter in (None, BASE):
            return -1
        if adapter not in self._index:
            raise no_such_adapter(adapter, self.adapters)
        return self._index[adapter]

    def generate(self, prompts, adapter, stop_ids, gen, on_tokens=None, cancel=None):
        from glmtune.infer.backends import generate_on_engine

        if on_tokens is not None and len(prompts) != 1:
            raise GlmtuneError("streaming works on one prompt at a time")
        return generate_on_engine(self.engine(stop_ids), self.adapter_index(adapter), prompts, gen, on_tokens, cancel)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        else:
            shut_down(self._conn, self._process, self._lock)


class RemoteEngine:
    """The parent's side of a started child engine (see the module docstring)."""

    def __init__(self, conn, process, info: dict):
        self._conn, self._process = conn, process
        self.stop_ids = set(info["stop_ids"])
        self.max_positions = info["max_positions"]
        self.summary = info["summary"]
        self.error: str | None = None
        self._send_lock = threading.Lock()
        self._in_flight: dict[int, RemoteSequence] = {}
        self._next_rid = 0
        self._closed = False
        self._receiver = threading.Thread(target=self._receive, daemon=True, name="glmtune-engine-receiver")
        self._receiver.start()

    @property
    def alive(self) -> bool:
        return not self._closed and self._process.is_alive() and self._receiver.is_alive()

    def warmup(self, *args, **kwargs) -> int:
        return 0  # the child captured its graphs before it answered "started"

    def submit(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None, adapter: int = -1,
               on_update=None, cancel: threading.Event | None = None) -> RemoteSequence:
        if not self.alive:
            raise EngineProcessError(f"the engine process has stopped{f' ({self.error})' if self.error else ''}")
        if not prompt:
            raise InputError("the prompt is empty", field="prompt")
        room = self.max_positions - len(prompt)
        if room < 1:  # the child would refuse it too; say so here, before any message
            raise InputError(f"the prompt is {len(prompt)} tokens; the engine holds {self.max_positions} "
                             f"(prompt + answer)", field="prompt", fix="shorten the prompt, or raise max_model_len")
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                    "repetition_penalty": repetition_penalty, "seed": seed, "adapter": adapter}
        with self._send_lock:
            rid = self._next_rid
            self._next_rid += 1
            seq = RemoteSequence(rid, on_update, cancel)
            self._in_flight[rid] = seq
            self._conn.send(("submit", rid, list(prompt), settings))
        return seq

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        shut_down(self._conn, self._process, self._send_lock)
        self._receiver.join(5)

    # -- the receiver thread --------------------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while True:
                if self._conn.poll(CANCEL_POLL):
                    message = self._conn.recv()
                    if message[0] == "steps":
                        self._apply(message[1])
                    elif message[0] == "failed":
                        self.error = message[1]
                self._send_cancels()
        except (EOFError, OSError):
            pass
        code = self._process.exitcode if not self._process.is_alive() else None
        if not self._closed:
            self.error = self.error or f"the engine process exited (code {code})"
            log.error("generation engine process stopped: %s", self.error)
        self._fail_all(EngineProcessError(self.error or "the engine process was closed"))

    def _apply(self, updates) -> None:
        for rid, new_ids, reason, err in updates:
            seq = self._in_flight.get(rid)
            if seq is None:
                continue
            if new_ids:
                seq.tokens.extend(new_ids)
            if reason is not None:
                if err is not None:
                    seq.error = error_from(err)
                seq.finish_reason = reason
                self._in_flight.pop(rid, None)
            self._notify(seq)
            if reason is not None:
                seq.done.set()

    def _notify(self, seq: RemoteSequence) -> None:
        if seq.on_update is None:
            return
        try:
            seq.on_update(seq)
        except Exception:  # noqa: BLE001 - one request's consumer failed: the others go on
            log.exception("a request's consumer failed")

    def _send_cancels(self) -> None:
        stopped = [s for s in list(self._in_flight.values())
                   if not s.cancel_sent and s.cancel is not None and s.cancel.is_set()]
        if not stopped:
            return
        with self._send_lock:
            for seq in stopped:
                seq.cancel_sent = True
                self._conn.send(("cancel", seq.rid))

    def _fail_all(self, error: BaseException) -> None:
        for rid, seq in list(self._in_flight.items()):
            self._in_flight.pop(rid, None)
            seq.error, seq.finish_reason = error, "error"
            self._notify(seq)
            seq.done.set()


def shut_down(conn, process, lock, wait_s: float = 15.0) -> None:
    """Ask the child to close (it frees the GPU as it ends), then kill it if it has not within ``wait_s``."""
    if process.is_alive():
        try:
            with lock:
                conn.send(("close",))
        except OSError:
            pass
        process.join(wait_s)
    if process.is_alive():
        process.kill()


# --------------------------------------------------------------------------------------------------
# the child process

def child_main(conn, spec: dict) -> None:
    """Load the model and its adapters, then run the engine for the parent until it says close."""
    import signal

    # Ctrl-C reaches the whole process group: the parent shuts the server down and then closes this
    # process; a KeyboardInterrupt here would only print a second traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from glmtune.infer.backends import HFBackend
        from glmtune.models.tokenizer import load_tokenizer

        backend = HFBackend(spec["model_dir"], load_tokenizer(spec["model_dir"]),
                            {n: Path(p) for n, p in spec["adapters"].items()}, device=spec["device"],
                            dtype=spec["dtype"], liger=spec["liger"], engine=spec["engine"])
        index = {a: backend.adapter_index(a) for a in backend.adapters} if backend.lora is not None else {}
        conn.send(("loaded", {"adapters": backend.adapters, "index": index, "engine_problem": backend.engine_problem,
                              "context_length": _context_length(backend.model), "device": str(backend.device)}))
        message = conn.recv()
        if message[0] != "start":
            return
        engine = backend.engine(message[1])
        engine.warmup()
        conn.send(("started", {"stop_ids": sorted(engine.stop_ids), "max_positions": engine.max_positions,
                               "summary": backend.engine_summary}))
    except Exception as e:  # noqa: BLE001 - the parent reports it and exits
        try:
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return
    ChildServer(conn, engine).run()
    backend.close()


class ChildServer:
    """The child's loop: requests from the pipe into the engine, each step's new ids back out."""

    def __init__(self, conn, engine):
        self.conn, self.engine = conn, engine
        self.cancels: dict[int, threading.Event] = {}
        self.sent: dict[int, int] = {}          # rid -> ids already sent
        self.changed: dict[int, object] = {}    # rid -> seq changed since the last send
        self.lock = threading.Condition()
        self.running = True

    def run(self) -> None:
        sender = threading.Thread(target=self._send_loop, daemon=True, name="glmtune-engine-sender")
        sender.start()
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "submit":
                    self._submit(*message[1:])
                elif message[0] == "cancel":
                    event = self.cancels.get(message[1])
                    if event is not None:
                        event.set()
                elif message[0] == "close":
                    break
        except (EOFError, OSError):
            pass  # the parent is gone
        with self.lock:
            self.running = False
            self.lock.notify()
        sender.join(5)

    def _submit(self, rid: int, prompt: list[int], settings: dict) -> None:
        cancel = threading.Event()
        self.cancels[rid] = cancel
        self.sent[rid] = 0
        try:
            self.engine.submit(prompt, cancel=cancel, on_update=lambda seq, rid=rid: self._changed(rid, seq),
                               **settings)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            self._forget(rid)
            self._send([(rid, [], "error", error_info(e))])

    def _changed(self, rid: int, seq) -> None:
        """On the engine's thread, per request and step: note it; the sender batches the step."""
        with self.lock:
            self.changed[rid] = seq
            self.lock.notify()

    def _send_loop(self) -> None:
        while True:
            with self.lock:
                while not self.changed and self.running:
                    self.lock.wait()
                if not self.changed and not self.running:
                    return
                changed, self.changed = self.changed, {}
            updates = []
            for rid, seq in changed.items():
                ids = seq.tokens
                reason = seq.finish_reason
                start = self.sent.get(rid, 0)
                new = list(ids[start:])
                self.sent[rid] = start + len(new)
                err = error_info(seq.error) if (reason is not None and seq.error is not None) else None
                updates.append((rid, new, reason, err))
                if reason is not None:
                    self._forget(rid)
            self._send(updates)

    def _send(self, updates) -> None:
        try:
            self.conn.send(("steps", updates))
        except OSError:
            self.running = False

    def _forget(self, rid: int) -> None:
        self.cancels.pop(rid, None)
        self.sent.pop(rid, None)


def _context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
