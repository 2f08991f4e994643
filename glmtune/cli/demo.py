"""`glmtune demo`: the whole pipeline on built-in data, on a CPU, in a few minutes.

data (4 kinds of customer-service request: convert -> clean -> split -> stats -> render) -> train (full
fine-tuning of a tiny GLM-4-shaped model that starts from random weights) -> export (model folder) -> held-out
accuracy, base vs fine-tuned -> one chat answer that reproduces a trained answer.
`--model smollm2` runs the same stages on a real pretrained model (glmtune/cli/demo_real.py).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console

from glmtune.cli.main import app
from glmtune.models.tiny import BUILTIN_GLM4_TOKENIZER


DEMO_MODELS = ("tiny", "smollm2")
# The tiny demo's recipe: the model starts from random weights, so there is nothing for LoRA to adapt
# (LoRA at lr 1e-2 stayed at loss ~11 after 55 steps); full fine-tuning with a large step size learns the
# 4 requests in ~50 steps of 8 (loss 0.02 at step 60 of a 100-step run). A step's cost is the
# 151k-vocabulary logits of every position, so the prompts stay short.
TINY_STEPS = 80
TINY_LR = 1e-2
TINY_METHOD = {"name": "full"}
TINY_CUTOFF = 128
# The folders under --out each stage writes (both demos; smollm2 has no base/): what a re-run over an
# earlier demo would replace, and all that --overwrite deletes.
STAGE_OUTPUTS = {"data": ("data",), "train": ("base", "train", "model"), "eval": ("eval",), "chat": ()}


@app.command("demo")
def demo(out: Optional[Path] = typer.Option(None, "--out", help="Output folder for every stage "
                                                                "(default: demo_out, or demo_out_smollm2)."),
         steps: Optional[int] = typer.Option(None, help=f"Training steps (default: tiny {TINY_STEPS}, smollm2 30)."),
         stages: str = typer.Option("data,train,eval,chat", help="Comma-separated stages to run."),
         model: str = typer.Option("tiny", "--model", help="tiny (random GLM-4-shaped, built in code) or smollm2 "
                                                           "(real SmolLM2-135M-Instruct, needs the real extra)."),
         overwrite: bool = typer.Option(False, help="Replace what an earlier demo wrote under --out for these "
                                                    "stages (without it: asked on a terminal, else refused).")):
    """Run the pipeline end to end on built-in data (tiny: a random GLM-4-shaped model learns 4 Chinese
    customer-service requests; smollm2: a real model learns English topics)."""
    if model not in DEMO_MODELS:
        from glmtune.errors import InputError
        raise InputError(f"unknown demo model {model!r}", field="--model", fix=f"use one of: {', '.join(DEMO_MODELS)}")
    stage_list = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in stage_list if s not in STAGE_OUTPUTS]
    if unknown or not stage_list:
        from glmtune.errors import InputError
        raise InputError(f"unknown stage {unknown[0]!r}" if unknown else "no stage given", field="--stages",
                         fix=f"a comma-separated subset of {','.join(STAGE_OUTPUTS)}")
    out = out or Path("demo_out_smollm2" if model == "smollm2" else "demo_out")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    prepare_demo_out(out, stage_list, overwrite=overwrite, confirm=typer.confirm if interactive else None)
    if model == "smollm2":
        from glmtune.cli.demo_real import SMOLLM2_STEPS, run_smollm2_demo
        run_smollm2_demo(out, steps=steps or SMOLLM2_STEPS, stages=stage_list)
        return
    run_demo(out, steps=steps or TINY_STEPS, stages=stage_list)


def prepare_demo_out(out: Path, stages, *, overwrite: bool, confirm: Callable[[str], bool] | None = None) -> None:
    """Decide, before any stage runs, what may happen to ``out`` (as ``glmtune train`` does for
    output.dir): the folders these stages write (STAGE_OUTPUTS) are used when missing or empty; when
    one holds files (an earlier demo, or a folder of the user's) they are deleted with ``overwrite``
    or a yes to ``confirm`` (a terminal), else refused with the fix. Nothing else under ``out`` is
    touched, so ``--stages eval`` after a full run reuses its data and model."""
    from glmtune.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError("--out is a file, not a folder", field="--out", file=out, fix="choose a folder path for --out")
    used = [out / name for stage in stages for name in STAGE_OUTPUTS[stage]
            if (out / name).exists() and (not (out / name).is_dir() or any((out / name).iterdir()))]
    if not used:
        return
    shown = ", ".join(p.name for p in used)
    if not overwrite and confirm is not None:
        overwrite = confirm(f"{out} already holds {shown} (an earlier demo?); delete and write them again?")
    if not overwrite:
        raise InputError(f"--out {out} is not empty: --stages {','.join(stages)} would write {shown} again",
                         field="--out", fix="--overwrite to replace them, or choose another --out")
    for path in used:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def run_demo(out: Path, *, steps: int = TINY_STEPS, stages=("data", "train", "eval", "chat"), console=None) -> dict:
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
    from glmtune.data.sample import REQUEST_SYSTEM, service_request_rows, write_rows_csv

    console.rule("[bold]1. data")
    raw = write_rows_csv(service_request_rows(), data_dir / "requests.csv")
    conv = convert_file(raw, data_dir / "requests.jsonl", format="classification", system=REQUEST_SYSTEM)
    console.print(f"convert: {conv.records} customer-service requests ({conv.labels} labelled, 4 kinds) "
                  f"-> {conv.out}")
    return clean_split_describe(conv.out, data_dir, ratios="8:1:1", template="glm4",
                                tokenizer=BUILTIN_GLM4_TOKENIZER, cutoff=TINY_CUTOFF, console=console)


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
    console.print(f"stats ({template} template): {stats.records} records, tokens p50/max "
                  f"{stats.tokens.p50}/{stats.tokens.max}, {stats.trained_tokens} trained tokens; at cutoff "
                  f"{cutoff}: {stats.after_cutoff}")
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
    console.print(f"model: {base} is a tiny GLM-4-shaped model (2 layers, hidden 64) with the real GLM-4 "
                  "tokenizer, built in code from [bold]random weights[/]: before this step it knows nothing "
                  "(see the base row in 4.)")
    config = {
        "model": {"path": str(base), "dtype": "fp32"},
        "data": {"datasets": [str(out / "data" / "train.jsonl")], "dev": str(out / "data" / "dev.jsonl"),
                 "template": "glm4", "cutoff_len": TINY_CUTOFF},
        "method": TINY_METHOD,
        "train": {"max_steps": steps, "batch_size": 8, "lr": TINY_LR, "scheduler": "cosine",
                  "warmup_ratio": 0.05, "seed": 42, "log_every": max(steps // 10, 1)},
        "eval": {"every": max(steps // 2, 1)},
        "output": {"dir": str(out / "train"), "save_every": max(steps // 2, 1), "keep_last": 2,
                   "tensorboard": False},
    }
    result = run_training(config, console=console)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    console.print(f"train loss: first logged {losses[0]:.4f} -> last {losses[-1]:.4f}; dev loss "
                  f"{result.eval_loss:.4f}; curve: {result.output_dir / 'loss.png'}")
    console.rule("[bold]3. export")
    export_merged(base, result.adapter_path, out / "model")
    console.print(f"merged model: {out / 'model'}")
    return {"first_loss": losses[0], "final_loss": losses[-1], "eval_loss": result.eval_loss,
            "steps": result.steps, "model": str(out / "model")}


def demo_eval(out: Path, console: Console) -> dict:
    from glmtune.data.sample import SERVICE_REQUESTS

    return held_out_eval(out, out / "base", list(SERVICE_REQUESTS), console, "held-out request classification")


def held_out_eval(out: Path, base: Path, labels: list[str], console: Console, title: str) -> dict:
    """Greedy answers on the held-out split, base model vs fine-tuned: exact-label accuracy, macro F1 and
    how many answers are no label at all (both demos)."""
    from rich.table import Table

    console.rule("[bold]4. evaluate (held-out split)")
    test = out / "data" / "test.jsonl"
    metrics = {"base": evaluate_answers(base, test, out / "eval" / "base", labels, title),
               "fine-tuned": evaluate_answers(out / "model", test, out / "eval" / "fine-tuned", labels, title)}
    table = Table("model", "accuracy", "macro F1", "not a label", title=title)
    for name, m in metrics.items():
        table.add_row(name, f"{m['accuracy']:.3f}", f"{m['f1_macro']:.3f}", f"{m['invalid_count']}/{m['n_samples']}")
    console.print(table)
    console.print(f"reports: {out / 'eval'}")
    return metrics


def evaluate_answers(model_dir: Path, test: Path, out_dir: Path, labels: list[str], title: str) -> dict:
    from glmtune.data.sample import topic_of
    from glmtune.evaluate.classification import classification_report_files
    from glmtune.infer.predict import predict_file
    from glmtune.infer.predictor import Predictor
    from glmtune.io import iter_jsonl

    preds = out_dir / "answers.jsonl"
    preds.unlink(missing_ok=True)  # predict_file resumes; a re-run must not keep the last run's answers
    predict_file(Predictor(model_dir), test, preds, batch_size=16, max_new_tokens=8)
    rows = [row for _, row in iter_jsonl(preds)]
    return classification_report_files([r["label"] for r in rows], [topic_of(r["prediction"]) for r in rows],
                                       labels, out_dir, raw_outputs=[r["prediction"] for r in rows],
                                       title=f"{title} (greedy answer)")


def demo_chat(out: Path, console: Console) -> dict:
    """One training request sent to the merged model: the reply should be the answer it was trained on."""
    from glmtune.infer.predictor import Predictor
    from glmtune.io import iter_jsonl

    console.rule("[bold]5. chat")
    _, rec = next(iter(iter_jsonl(out / "data" / "train.jsonl")))
    system, user, trained = (m["content"] for m in rec["messages"])
    reply = Predictor(out / "model")(user, system=system, max_new_tokens=8)
    same = reply.strip() == trained
    console.print(f"system: {system}\nuser: {user}\nassistant: {reply}\n"
                  f"trained answer: {trained} ({'reproduced' if same else 'not reproduced'})", markup=False)
    return {"user": user, "reply": reply, "trained": trained, "reproduced": same}
