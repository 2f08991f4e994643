"""OpenAI-compatible HTTP server: `/v1/chat/completions` (JSON or SSE), `/v1/models`, `/health`.

Errors always use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so the
official clients raise the right exception: bad input 400, bad key 401, unknown model 404,
body too large 413, queue full 429, timeout 504. Bad input never yields 500.

Limits are checked before any model work: the body size while it is received (413, the rest of
the body then drained so a client still sending reads it), request headers that take longer than
``header_timeout`` (the connection is closed: glmtune.serve.uvicorn_server), the prompt's
token count against the model's context (400, code ``context_length_exceeded``); ``max_tokens`` is
capped to the context left. A request that times out or whose client disconnects (streaming or
not) is stopped at the next token (see glmtune.serve.engine).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from pathlib import Path

from starlette.requests import Request  # at module level: FastAPI resolves route annotations here

from glmtune.errors import GlmtuneError, InputError
from glmtune.infer.backends import BASE
from glmtune.serve import schemas
from glmtune.serve.engine import Job, QueueFull, make_engine


def create_app(predictor, *, api_key: str | None = None, max_queue: int = 64, timeout: float = 120.0,
               max_tokens: int = 2048, model_name: str | None = None, image_root: str | Path | None = None,
               max_body: int = 1 << 20):
    """Build the FastAPI app around a loaded :class:`~glmtune.infer.predictor.Predictor`.

    ``timeout``: seconds from arrival to the last token (queue wait included); ``max_tokens``: the
    most new tokens one request may ask for; ``image_root``: the one folder whose pictures requests
    may name by path (None: images only as data: URIs); ``max_body``: the largest request body in bytes.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = make_engine(predictor, max_queue=max_queue)
    context = context_length(predictor)
    if getattr(engine, "max_positions", None):  # the engine's slots may hold less than the model can
        context = min(context or engine.max_positions, engine.max_positions)
    base_name = model_name or Path(predictor.model_dir).name
    # Which model ids select what: the base name (and "base") -> no adapter; each adapter by name.
    targets = {base_name: BASE, BASE: BASE, **{a: a for a in predictor.adapters}}
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="glmtune", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_body=max_body)

    def error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(schemas.error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        # FastAPI's default is 422 with its own shape; OpenAI clients expect 400 and `error`.
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        where = f" (at {param})" if param else ""
        return error(400, f"{first.get('msg', 'invalid request')}{where}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, exc: InputError):
        return error(400, str(exc), param=exc.field)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    def check_key(app_):
        """Pure ASGI middleware, not a dependency, so a wrong key gets 401 before the body is even
        parsed (and not Starlette's BaseHTTPMiddleware, which hides client disconnects from routes)."""
        async def middleware(scope, receive, send):
            if api_key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
                auth = Request(scope).headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), api_key.encode()):
                    return await error(401, "Incorrect API key provided" if given else
                                       "Missing API key: send `Authorization: Bearer KEY`",
                                       code="invalid_api_key")(scope, receive, send)
            return await app_(scope, receive, send)
        return middleware

    app.add_middleware(check_key)

    @app.get("/health")
    async def health():
        # the engine's loop, not only the HTTP layer: a dead engine answers nothing, so say so (503)
        alive = engine.alive
        body = {"status": "ok" if alive else "engine stopped", "model": base_name, "waiting": engine.waiting,
                "max_queue": max_queue, "engine_alive": alive,
                "engine_last_error": getattr(engine, "last_error", None)}
        return body if alive else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        ids = [base_name] + predictor.adapters
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "glmtune"}
                                           for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: schemas.ChatCompletionRequest, request: Request):
        if req.model not in targets:
            return error(404, f"The model '{req.model}' does not exist; this server has "
                              f"{', '.join([base_name] + predictor.adapters)}", param="model",
                         code="model_not_found")
        if not engine.alive:  # say so at once: a request to a dead engine would only wait for its timeout
            return error(503, f"the generation engine has stopped ({getattr(engine, 'last_error', None) or 'see the server log'})",
                         "server_error", code="engine_stopped")
        messages = schemas.canonical_messages(req.messages, image_root)
        template = predictor.template.variant(**(req.chat_template_kwargs or {}))
        # Retrieval embeds the question: run it off the event loop.
        prompt_ids, _sources = await asyncio.to_thread(predictor.prepare, messages, req.tools, template)
        cap = max_tokens
        if context is not None:
            if len(prompt_ids) >= context:
                return error(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} "
                                  f"tokens (prompt + answer): shorten the messages", param="messages",
                             code="context_length_exceeded")
            cap = min(cap, context - len(prompt_ids))  # the answer gets what the context has left
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, targets[req.model], _gen(req, cap), loop, asyncio.Queue(),
                  stream=req.stream)
        try:
            engine.submit(job)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error", code="queue_full")
        deadline = loop.time() + timeout
        cid = schemas.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, deadline, cid, req.model, len(prompt_ids), include_usage,
                                          template.output_stream(req.tools)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            kind, value = await _next_final(job, deadline, request)
        finally:
            job.stop()  # a disconnect or timeout stops generation; harmless when finished
        if kind == "disconnected":
            return error(499, "client closed the request", code="client_closed")
        if kind == "timeout":
            return error(504, f"generation took longer than {timeout:g} s", "timeout_error", code="timeout")
        if kind == "error":
            return _error_for(value, error)
        text, out = value
        return schemas.completion(cid, req.model, template.parse_output(text, req.tools), _finish(out),
                                  len(prompt_ids), len(out.token_ids))

    return app


def _gen(req: schemas.ChatCompletionRequest, cap: int) -> dict:
    return {k: v for k, v in req.gen_kwargs(cap).items() if v is not None}


def _finish(out) -> str:
    return "stop" if out.finish_reason == "stop" else "length"


def _error_for(exc: Exception, error):
    if isinstance(exc, InputError):
        return error(400, str(exc), param=exc.field)
    if isinstance(exc, GlmtuneError):
        return error(400, str(exc))
    return error(500, f"generation failed: {type(exc).__name__}", "server_error")


# How often a non-streaming request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.25


async def _next_final(job: Job, deadline: float, request):
    """Wait for the job's result, skipping streamed text; ("timeout", None) past the deadline,
    ("disconnected", None) as soon as the client has gone (checked every DISCONNECT_POLL s)."""
    loop = asyncio.get_running_loop()
    while True:
        step = min(deadline, loop.time() + DISCONNECT_POLL)
        kind, value = await _next_event(job, step)
        if kind == "timeout":
            if loop.time() >= deadline:
                return kind, value
            if await request.is_disconnected():
                return "disconnected", None
            continue
        if kind != "text":
            return kind, value


async def _next_event(job: Job, deadline: float):
    """The job's next event, or ("timeout", None) at ``deadline`` (the loop's clock): a queued one is
    taken at once, and the wait is ``asyncio.timeout_at`` where Python has it (``wait_for`` wraps the
    get in a new task). A non-streamed request's wait, in polls (streams use one timer instead)."""
    if not job.events.empty() and asyncio.get_running_loop().time() < deadline:
        return job.events.get_nowait()
    try:
        if hasattr(asyncio, "timeout_at"):
            async with asyncio.timeout_at(deadline):
                return await job.events.get()
        remaining = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0))
    except asyncio.TimeoutError:
        return "timeout", None


def context_length(predictor) -> int | None:
    """Tokens the model can attend to (prompt + answer), from its config; None when unknown."""
    backend = getattr(predictor, "backend", None)
    if getattr(backend, "context_length", None):  # a back-end whose model is in another process says it
        return backend.context_length
    model = getattr(backend, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# A refused body is still read (and dropped) up to this much before the connection closes: a client
# that sends its whole body before reading (urllib, requests) then reads the 413, where closing a
# socket with unread data would make the kernel answer with a reset that discards the 413.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0


class BodyLimit:
    """ASGI middleware: a request body over ``max_body`` bytes gets 413 before it is read further,
    judged by Content-Length when given, else counted as it arrives (chunked uploads). The 413 is
    sent first, then the rest of the body is drained (bounded by DRAIN_BYTES / DRAIN_SECONDS) and
    the connection closed."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            # a client waiting for `100 Continue` has sent nothing yet; one sending more than we
            # would drain gets the reset whatever we do
            drain = b"100-continue" not in headers.get(b"expect", b"").lower() and int(length) <= DRAIN_BYTES
            return await self._reject(send, receive if drain else None)
        seen, started, rejected = 0, False, False

        async def counted_receive():
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body and not started:
                    # Answer now; the app sees a client that went away, and whatever it sends is dropped.
                    rejected = True
                    await self._reject(send, receive if message.get("more_body") else None)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, tracked_send)

    async def _reject(self, send, receive=None):
        """Answer 413; with ``receive``, drain the body before the response (and connection) ends."""
        body = json.dumps(schemas.error_body(f"request body too large: the limit is {self.max_body} bytes "
                                             f"(glmtune serve --max-body)", code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        # the body's bytes go out now (a client that reads while sending sees them at once); the
        # response stays open, so the server keeps reading the request, until the drain is over
        await send({"type": "http.response.body", "body": body, "more_body": receive is not None})
        if receive is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(receive, DRAIN_BYTES), DRAIN_SECONDS)
            await send({"type": "http.response.body", "body": b""})


async def _drain(receive, limit: int) -> None:
    """Read and drop request body messages until the body ends, the client leaves or ``limit`` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        seen += len(message.get("body", b""))


async def _sse(job: Job, deadline: float, cid: str, model: str, prompt_tokens: int, include_usage: bool,
               parser=None):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

    ``parser``: the template's output stream (GLM-4.5+): text pieces become ``reasoning_content`` /
    ``content`` / ``tool_calls`` deltas, and an answer that called tools finishes with ``tool_calls``.
    Once streaming has begun the status is already 200, so a timeout or failure is sent as an
    ``error`` event (the openai client raises it) before the stream closes.
    """
    def deltas(text: str, final: bool = False) -> list[dict]:
        if parser is None:
            return [{"content": text}] if text else []
        return parser.finish() if final else parser.feed(text)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    created = int(time.time())
    content = schemas.content_events(cid, model, created)
    # One timer per stream, not a timeout scope per token (a timer handle made and cancelled for every
    # streamed token): at the deadline a ("timeout", None) event joins the stream's queue.
    timer = asyncio.get_running_loop().call_at(deadline, job.put, "timeout", None)
    try:
        yield sse(schemas.chunk(cid, model, {"role": "assistant", "content": ""}, created=created))
        held = None
        while True:
            kind, value = held if held is not None else await job.events.get()
            held = None
            if kind == "text":
                # pieces that queued up while this stream waited its turn go out as one chunk
                while not job.events.empty():
                    more = job.events.get_nowait()
                    if more[0] != "text":
                        held = more
                        break
                    value += more[1]
                if parser is None:  # plain text: the prebuilt event, the common per-token case
                    if value:
                        yield content(value)
                    continue
                for delta in deltas(value):
                    yield sse(schemas.chunk(cid, model, delta, created=created))
                continue
            if kind == "done":
                _, out = value
                for delta in deltas("", final=True):
                    yield sse(schemas.chunk(cid, model, delta, created=created))
                finish = _finish(out)
                if finish == "stop" and parser is not None and parser.calls:
                    finish = "tool_calls"
                yield sse(schemas.chunk(cid, model, {}, finish, created=created))
                if include_usage:
                    yield sse({**schemas.chunk(cid, model, {}, created=created), "choices": [],
                               "usage": schemas.usage(prompt_tokens, len(out.token_ids))})
            elif kind == "timeout":
                yield sse(schemas.error_body("generation timed out", "timeout_error", code="timeout"))
            else:
                yield sse(schemas.error_body(f"generation failed: {value}", "server_error"))
            break
        yield "data: [DONE]\n\n"
    finally:
        timer.cancel()
        job.stop()  # client gone or stream over: the engine stops this job


def serve(predictor, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = 20.0,
          **app_kwargs) -> None:
    """Run the server until interrupted (uvicorn, one process: the model is loaded once).

    ``header_timeout``: seconds a connection may take to send its request headers (then it is closed).
    """
    import uvicorn

    from glmtune.serve.uvicorn_server import Server, header_timeout_protocol

    app = create_app(predictor, **app_kwargs)
    started = time.strftime("%H:%M:%S")
    print(f"[{started}] glmtune serving {Path(predictor.model_dir).name} on http://{host}:{port}/v1 "
          f"(adapters: {', '.join(predictor.adapters) or 'none'})", flush=True)
    summary = getattr(predictor.backend, "engine_summary", None)
    if summary:
        print(f"[{started}] {summary}", flush=True)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   http=header_timeout_protocol(header_timeout)))
    server.run()
    if server.interrupted:
        raise KeyboardInterrupt  # after a clean shutdown: the CLI says "interrupted", status 130
    if not server.started:
        raise InputError(f"the server could not listen on {host}:{port} (uvicorn's error is above)", field="--port",
                         fix="pass another --port, or stop the process that holds this one")
