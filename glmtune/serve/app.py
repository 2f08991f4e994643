"""OpenAI-compatible HTTP server: `/v1/chat/completions` (JSON or SSE), `/v1/models`, `/health`.

Errors always use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so the
official clients raise the right exception: bad input 400, bad key 401, unknown model 404,
queue full 429, timeout 504. Bad input never yields 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from pathlib import Path

from glmtune.errors import GlmtuneError, InputError
from glmtune.infer.backends import BASE
from glmtune.serve import schemas
from glmtune.serve.engine import Engine, Job, QueueFull


def create_app(predictor, *, api_key: str | None = None, max_queue: int = 64, timeout: float = 120.0,
               max_tokens: int = 2048, model_name: str | None = None, image_root: str | Path | None = None):
    """Build the FastAPI app around a loaded :class:`~glmtune.infer.predictor.Predictor`.

    ``timeout``: seconds from arrival to the last token (queue wait included); ``max_tokens``: the
    most new tokens one request may ask for; ``image_root``: the one folder whose pictures requests
    may name by path (None: images only as data: URIs).
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    engine = Engine(predictor, max_queue=max_queue)
    base_name = model_name or Path(predictor.model_dir).name
    # Which model ids select what: the base name (and "base") -> no adapter; each adapter by name.
    targets = {base_name: BASE, BASE: BASE, **{a: a for a in predictor.adapters}}
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="glmtune", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine

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

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        # Middleware, not a dependency, so a wrong key gets 401 before the body is even parsed.
        if api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error(401, "Incorrect API key provided" if given else
                             "Missing API key: send `Authorization: Bearer KEY`", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": base_name, "waiting": engine.waiting, "max_queue": max_queue}

    @app.get("/v1/models")
    async def models():
        ids = [base_name] + predictor.adapters
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "glmtune"}
                                           for i in ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: schemas.ChatCompletionRequest):
        if req.model not in targets:
            return error(404, f"The model '{req.model}' does not exist; this server has "
                              f"{', '.join([base_name] + predictor.adapters)}", param="model",
                         code="model_not_found")
        messages = schemas.canonical_messages(req.messages, image_root)
        # Retrieval embeds the question: run it off the event loop.
        prompt_ids, _sources = await asyncio.to_thread(predictor.prepare, messages, req.tools)
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, targets[req.model], _gen(req, max_tokens), loop, asyncio.Queue(),
                  stream=req.stream)
        try:
            engine.submit(job)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error", code="queue_full")
        deadline = loop.time() + timeout
        cid = schemas.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, deadline, cid, req.model, len(prompt_ids), include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            kind, value = await _next_final(job, deadline)
        finally:
            job.cancel.set()  # a disconnect or timeout stops generation; harmless when finished
        if kind == "timeout":
            return error(504, f"generation took longer than {timeout:g} s", "timeout_error", code="timeout")
        if kind == "error":
            return _error_for(value, error)
        text, out = value
        return schemas.completion(cid, req.model, text, _finish(out), len(prompt_ids), len(out.token_ids))

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


async def _next_final(job: Job, deadline: float):
    """Wait for the job's result, skipping streamed text; ("timeout", None) past the deadline."""
    while True:
        kind, value = await _next_event(job, deadline)
        if kind != "text":
            return kind, value


async def _next_event(job: Job, deadline: float):
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(job.events.get(), timeout=max(remaining, 0.0))
    except asyncio.TimeoutError:
        return "timeout", None


async def _sse(job: Job, deadline: float, cid: str, model: str, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

    Once streaming has begun the status is already 200, so a timeout or failure is sent as an
    ``error`` event (the openai client raises it) before the stream closes.
    """
    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield sse(schemas.chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await _next_event(job, deadline)
            if kind == "text":
                yield sse(schemas.chunk(cid, model, {"content": value}))
                continue
            if kind == "done":
                _, out = value
                yield sse(schemas.chunk(cid, model, {}, _finish(out)))
                if include_usage:
                    yield sse({**schemas.chunk(cid, model, {}), "choices": [],
                               "usage": schemas.usage(prompt_tokens, len(out.token_ids))})
            elif kind == "timeout":
                yield sse(schemas.error_body("generation timed out", "timeout_error", code="timeout"))
            else:
                yield sse(schemas.error_body(f"generation failed: {value}", "server_error"))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # client gone or stream over: the worker stops this job


def serve(predictor, host: str = "127.0.0.1", port: int = 8000, **app_kwargs) -> None:
    """Run the server until interrupted (uvicorn, one process: the model is loaded once)."""
    import uvicorn

    app = create_app(predictor, **app_kwargs)
    started = time.strftime("%H:%M:%S")
    print(f"[{started}] glmtune serving {Path(predictor.model_dir).name} on http://{host}:{port}/v1 "
          f"(adapters: {', '.join(predictor.adapters) or 'none'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
