"""`glmtune demo`: the whole pipeline on built-in data, on a CPU, in a few minutes.

data (convert -> clean -> split -> stats -> render) -> train (LoRA on a tiny GLM-4-shaped model)
-> export (merged model folder) -> predict + generation metrics -> one chat answer.
`--model smollm2` runs the same stages on a real pretrained model (glmtune/cli/demo_real.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from glmtune.cli.main import app

BUILTIN_GLM4_TOKENIZER = Path(__file__).resolve().parents[1] / "resources" / "tokenizers" / "glm4"


DEMO_MODELS = ("tiny", "smollm2")


@app.command("demo")
def demo(out: Optional[Path] = typer.Option(None, "--out", help="Output folder for every stage "
                                                                "(default: demo_out, or demo_out_smollm2)."),
         steps: Optional[int] = typer.Option(None, help="Training steps (default: tiny 40, smollm2 30; on 2 CPU "
                                                        "cores ~0.5 s and ~2 s each)."),
         stages: str = typer.Option("data,train,eval,chat", help="Comma-separated stages to run."),
         model: str = typer.Option("tiny", "--model", help="tiny (random GLM-4-shaped, built in code) or smollm2 "
                                                           "(real SmolLM2-135M-Instruct, needs the real extra).")):
    """Run the pipeline end to end on built-in data (tiny: CMCC-34-shaped sample; smollm2: English topics)."""
    if model not in DEMO_MODELS:
        from glmtune.errors import InputError
        raise InputError(f"unknown demo model {model!r}", field="--model", fix=f"use one of: {', '.join(DEMO_MODELS)}")
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    if model == "smollm2":
        from glmtune.cli.demo_real import SMOLLM2_STEPS, run_smollm2_demo
        run_smollm2_demo(out or Path("demo_out_smollm2"), steps=steps or SMOLLM2_STEPS, stages=stage_list)
        return
    run_demo(out or Path("demo_out"), steps=steps or 40, stages=stage_list)


def run_demo(out: Path, *, steps: int = 40, stages=("data", "train", "eval", "chat"), console=None) -> dict:
    console = console or Console()
    out = Path(out)
    results: dict = {}
    if "data" in stages:
        results["data"] = demo_data(out / "data", console)
    if "train" in stages:
        results["train"] = demo_train(out, steps, console)
    if "eval" in stages:
        results["eval"] = demo_eval(out, console)
    if "chat" in stages:
        results["chat"] = demo_chat(out, console)
    console.print(f"[bold green]demo done[/] -> {out}")
    return results


def demo_data(data_dir: Path, console: Console) -> dict:
    from glmtune.data.pipeline import convert_file
    from glmtune.data.sample import sample_path

    console.rule("[bold]1. data")
    conv = convert_file(sample_path("cmcc34"), data_dir / "cmcc34.jsonl", format="cmcc")
    console.print(f"convert: {conv.records} records -> {conv.out}")
    return clean_split_describe(conv.out, data_dir, ratios="8:1:1", template="glm4",
                                tokenizer=BUILTIN_GLM4_TOKENIZER, cutoff=1024, console=console, render_tail=300)


def clean_split_describe(converted: Path, data_dir: Path, *, ratios: str, template: str, tokenizer: Path,
                         cutoff: int, console: Console, render_tail: int | None = None) -> dict:
    """The demo's data stages after convert (both demos): clean, stratified split, token stats, and one
    training record rendered with its trained tokens marked. Returns the split files."""
    from glmtune.data.pipeline import clean_file, render_file, split_file, stats_file

    cleaned = converted.with_name(converted.stem + ".clean.jsonl")
    report = clean_file(converted, cleaned)
    console.print(f"clean: {report.records_in} -> {report.records_out} records "
                  f"({report.records_changed} changed)")
    split, paths = split_file(cleaned, data_dir, ratios=ratios, stratify="label", seed=42)
    console.print("split: " + ", ".join(f"{k}={len(v)}" for k, v in split.parts.items()))
    stats = stats_file(paths["train"], template=template, tokenizer=tokenizer, cutoff=cutoff)
    console.print(f"stats ({template} template): {stats}")
    view = render_file(paths["train"], template=template, tokenizer=tokenizer, index=0)
    console.print("render (trained tokens in [[...]]):")
    marked = "".join(f"[[{text}]]" if trained else text for text, trained in view.spans)
    console.print(marked[-render_tail:] if render_tail else marked, markup=False, highlight=False)
    return {k: str(v) for k, v in paths.items()}


def demo_train(out: Path, steps: int, console: Console) -> dict:
    from glmtune.models.tiny import build_tiny_glm4
    from glmtune.train import run_training
    from glmtune.train.export import export_merged

    console.rule("[bold]2. train")
    base = out / "base"
    if not (base / "config.json").exists():
        build_tiny_glm4(base, BUILTIN_GLM4_TOKENIZER)
    config = {
        "model": {"path": str(base), "dtype": "fp32"},
        "data": {"datasets": [str(out / "data" / "train.jsonl")], "dev": str(out / "data" / "dev.jsonl"),
                 "template": "glm4", "cutoff_len": 1024, "packing": False},
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-3, "scheduler": "cosine",
                  "warmup_ratio": 0.1, "seed": 42},
        "eval": {"every": max(steps // 4, 1)},
        "output": {"dir": str(out / "train"), "save_every": max(steps // 2, 1), "keep_last": 2},
    }
    result = run_training(config, console=console)
    console.print(f"loss curve: {result.output_dir / 'loss.png'}")
    console.rule("[bold]3. export")
    export_merged(base, result.adapter_path, out / "model")
    console.print(f"merged model: {out / 'model'}")
    return {"final_loss": result.final_loss, "eval_loss": result.eval_loss, "model": str(out / "model")}


def demo_eval(out: Path, console: Console) -> dict:
    from glmtune.evaluate.generation import generation_report_files
    from glmtune.infer.predict import predict_file
    from glmtune.infer.predictor import Predictor

    console.rule("[bold]4. evaluate")
    predictor = Predictor(out / "model")
    preds = out / "eval" / "predictions.jsonl"
    predict_file(predictor, out / "data" / "test.jsonl", preds, batch_size=8, max_new_tokens=16)
    metrics = generation_report_files(preds, out / "eval", metrics=["bleu", "rouge", "ter"], tokenize="char")
    console.print({k: v for k, v in metrics.items() if k in ("bleu_4", "rouge_l", "ter")})
    return metrics


def demo_chat(out: Path, console: Console) -> str:
    from glmtune.data.cmcc import cmcc_system_prompt
    from glmtune.infer.predictor import Predictor

    console.rule("[bold]5. chat")
    predictor = Predictor(out / "model")
    query = "我想取消我的流量包[SEP]好的请问您要取消哪一个"
    answer = predictor(query.replace("[SEP]", "\n"), system=cmcc_system_prompt(), max_new_tokens=16)
    console.print(f"user: {query}\nassistant: {answer}", markup=False)
    return answer
