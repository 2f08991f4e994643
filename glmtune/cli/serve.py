"""`glmtune serve`: an OpenAI-compatible HTTP server for a model folder and its adapters."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmtune.cli.infer import COMPILE_HELP
from glmtune.cli.main import app


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (HF layout + glmtune.json)."),
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", help="NAME=DIR, repeatable; a request's `model` field picks NAME "
                                "(the model folder's name means no adapter)."),
    api_key: Optional[str] = typer.Option(None, envvar="GLMTUNE_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1 (env GLMTUNE_API_KEY)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it on this machine."),
    port: int = typer.Option(8000, help="TCP port."),
    max_queue: int = typer.Option(64, help="Requests allowed in the server at once (batched together on the "
                                           "hf back-end); more get HTTP 429."),
    timeout: float = typer.Option(120.0, help="Seconds per request, queue wait included (then 504)."),
    max_tokens: int = typer.Option(2048, help="Most new tokens a request may ask for (also capped by the "
                                              "context the prompt leaves)."),
    header_timeout: float = typer.Option(20.0, min=0.01, help="Seconds a connection may take to send its request "
                                                           "headers before it is closed (slow-client guard)."),
    max_body: Optional[int] = typer.Option(None, help="Largest request body in bytes; larger ones get HTTP 413. "
                                                     "Default: 1 MiB, or room for the image limits on a "
                                                     "vision-language model (data: URIs are base64, 4/3 the bytes)."),
    model_name: Optional[str] = typer.Option(None, help="Model id to serve the base model as (default: folder name)."),
    template: Optional[str] = typer.Option(None, help="Template family; default: from the model folder."),
    rag: Optional[Path] = typer.Option(None, help="RAG store from `glmtune rag index` to answer from."),
    rag_threshold: float = typer.Option(0.3, help="Least cosine similarity for a passage to be used."),
    backend: str = typer.Option("hf", help="hf or vllm."),
    engine: str = typer.Option("auto", help="hf back-end: auto = glmtune's generation engine (continuous "
                                            "batching, CUDA graphs, adapters batched), off = one request at a time."),
    liger: str = typer.Option("auto", help="liger-kernel's RMSNorm/SwiGLU (fewer kernels per decode step), as the "
                                           "training config's speed.liger: auto (on CUDA when installed, and not beside "
                                           "the compiled decode step, which fuses them itself) | all | none."),
    max_model_len: Optional[int] = typer.Option(None, help="Prompt + answer tokens per request the engine's KV "
                                                           "cache holds (default: the model's context, at most "
                                                           "8192 on a GPU, 2048 on a CPU)."),
    compile_decode: Optional[bool] = typer.Option(None, "--compile/--no-compile", help=COMPILE_HELP),
    engine_process: Optional[bool] = typer.Option(
        None, "--engine-process/--no-engine-process",
        help="Run the model and its engine in a process of their own, so HTTP and text never wait on the "
             "decode loop's interpreter lock (hf back-end; default: on with a CUDA GPU, off on a CPU)."),
    image_root: Optional[Path] = typer.Option(
        None, help="Folder whose pictures requests may name by path (image_url: a path or file://); "
                   "without it, images come only as data: URIs. Paths outside it are refused."),
    image_max_mb: float = typer.Option(20.0, help="Largest image file / decoded data: URI, in MiB (else 400)."),
    image_max_pixels: int = typer.Option(40_000_000, help="Most pixels (width x height) of a picture as sent."),
    image_max_count: int = typer.Option(8, help="Most images in one request."),
) -> None:
    """Serve /v1/chat/completions (JSON and streaming), /v1/models and /health."""
    from glmtune.cli.infer import adapter_option, engine_option
    from glmtune.infer.predictor import Predictor
    from glmtune.infer.vision import ImageLimits
    from glmtune.serve.app import serve

    if image_root is not None and not image_root.is_dir():
        from glmtune.errors import InputError
        raise InputError(f"image folder not found: {image_root}", field="--image-root",
                         fix="pass an existing folder, or leave --image-root out (data: URIs only)")
    limits = ImageLimits(max_bytes=int(image_max_mb * 2**20), max_pixels=image_max_pixels,
                         max_images=image_max_count)
    engine_kwargs = {"engine": engine_option(engine, max_model_len, compile_decode), "liger": liger} if backend == "hf" else {}
    own_process = engine_process_choice(engine_process, backend=backend, engine=engine, model=model)
    predictor = Predictor(model, adapter=adapter_option(adapter), backend="hf-process" if own_process else backend,
                          template=template, rag=rag, rag_threshold=rag_threshold, image_limits=limits,
                          **engine_kwargs)
    if own_process and predictor.backend.engine_problem is not None:
        # the child loaded the model and found the engine cannot run it: serve in this process instead
        print(f"glmtune serve: the engine cannot run in its own process ({predictor.backend.engine_problem}); "
              "loading the model here", flush=True)
        predictor.close()
        predictor = Predictor(model, adapter=adapter_option(adapter), backend=backend, template=template,
                              rag=rag, rag_threshold=rag_threshold, image_limits=limits, **engine_kwargs)
    if max_body is None:
        max_body = 1 << 20
        if predictor.vision is not None:
            max_body += int(limits.max_bytes * limits.max_images * 4 / 3)
    # Requests name their adapter; with none named the server answers with the base model.
    predictor.default_adapter = None
    try:
        serve(predictor, host=host, port=port, api_key=api_key, max_queue=max_queue, timeout=timeout,
              max_tokens=max_tokens, model_name=model_name, image_root=image_root, max_body=max_body,
              header_timeout=header_timeout)
    finally:
        predictor.close()


def engine_process_choice(asked: bool | None, *, backend: str, engine: str, model: Path) -> bool:
    """Whether the model and engine go into a process of their own: asked, else on with a CUDA GPU.
    Only the hf back-end's engine can (not vLLM, not `--engine off`, not a vision-language model,
    whose pictures go through this process's processor)."""
    from glmtune.errors import InputError
    from glmtune.models.loading import is_vision_model

    why = ("--backend is not hf" if backend != "hf" else "--engine off" if engine == "off"
           else "a vision-language model" if is_vision_model(model) else None)
    if asked and why:
        raise InputError(f"--engine-process needs glmtune's engine on a text model ({why})", field="--engine-process",
                         fix="leave --engine-process out")
    if asked is not None:
        return asked
    if why:
        return False
    import torch
    return torch.cuda.is_available()
