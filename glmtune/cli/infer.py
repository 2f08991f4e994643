"""`glmtune chat` (terminal chat) and `glmtune predict` (batch inference over a dataset)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmtune.cli.main import app

ADAPTER_HELP = "LoRA adapter folder; repeat as NAME=DIR to load several (the first is used)."
ENGINE_HELP = ("hf back-end: auto = glmtune's generation engine (continuous batching, CUDA graphs), "
               "off = transformers' generate.")


COMPILE_HELP = ("torch.compile the engine's decode layers (fused kernels: 1.4x the decode step on an H200; "
                "~1 min once at start, so serve's default: on with CUDA graphs; needs graphs on a GPU, not a 4-bit base).")


def engine_option(value: str, max_model_len: int | None = None, compile: bool | None = False):
    """`--engine` (+ `--max-model-len`, `--compile/--no-compile`; None: on CUDA) -> what Predictor's
    ``engine`` takes."""
    from glmtune.errors import InputError

    if value not in ("auto", "off"):
        raise InputError(f"unknown --engine '{value}'", field="--engine", fix="use auto or off")
    settings = {"max_model_len": max_model_len} if max_model_len else {}
    settings["compile"] = compile
    if value == "off":
        if "max_model_len" in settings:
            raise InputError("--max-model-len sizes the engine, which --engine off turns off",
                             field="--max-model-len", fix="drop one of the two")
        return "off"
    return settings


def adapter_option(values: Optional[List[str]]):
    """`DIR` or `NAME=DIR` (repeatable) -> what Predictor's ``adapter`` takes."""
    from glmtune.errors import InputError
    from glmtune.infer.backends import check_adapter_name

    if not values:
        return None
    named = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        if not name or not path:
            raise InputError(f"bad --adapter '{v}'", field="--adapter", fix="use DIR or NAME=DIR")
        check_adapter_name(name, field="--adapter")
        if name in named:
            raise InputError(f"adapter name '{name}' given twice", field="--adapter", fix="use NAME=DIR")
        named[name] = path
    return named


@app.command("chat")
def chat_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (HF layout + glmtune.json)."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    system: Optional[str] = typer.Option(None, help="System prompt (change it in the chat with /system TEXT)."),
    template: Optional[str] = typer.Option(None, help="Template family; default: from the model folder."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy (reproducible); e.g. 0.8 to sample."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with temperature > 0)."),
    rag: Optional[Path] = typer.Option(None, help="RAG store from `glmtune rag index` to answer from."),
    rag_threshold: float = typer.Option(0.3, help="Least cosine similarity for a passage to be used."),
    backend: str = typer.Option("hf", help="hf or vllm."),
) -> None:
    """Chat with a model in the terminal: streaming answers, /reset, /system TEXT, /exit."""
    from glmtune.infer.chat import run_chat
    from glmtune.infer.predictor import Predictor

    predictor = Predictor(model, adapter=adapter_option(adapter), backend=backend, template=template,
                          rag=rag, rag_threshold=rag_threshold)
    run_chat(predictor, system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)


@app.command("predict")
def predict_cmd(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (HF layout + glmtune.json)."),
    data: Path = typer.Option(..., "--data", help="Canonical records (JSONL); the last assistant turn is the reference."),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions JSONL; rows already there are skipped (resume)."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    batch_size: int = typer.Option(64, help="Prompts generated together and written as one block "
                                            "(also the most a kill can lose)."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per answer."),
    template: Optional[str] = typer.Option(None, help="Template family; default: from the model folder."),
    backend: str = typer.Option("hf", help="hf or vllm."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    compile_decode: bool = typer.Option(False, "--compile/--no-compile", help=COMPILE_HELP),
) -> None:
    """Greedy predictions for a dataset, resumable, as rows `glmtune eval generate` scores."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from glmtune.infer.predict import predict_file
    from glmtune.infer.predictor import Predictor

    predictor = Predictor(model, adapter=adapter_option(adapter), backend=backend, template=template,
                          **({"engine": engine_option(engine, compile=compile_decode)} if backend == "hf" else {}))
    console = Console(stderr=True)
    with Progress("predict", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("predict", total=None)
        stats = predict_file(predictor, data, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             on_progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"wrote {stats['written']} predictions to {out} "
                  f"({stats['skipped']} already there, {stats['total']} records)")
