"""`glmtune eval ...`: compare, generate, judge (classify is added by the model-driven classifier).

Thin: parse arguments, call one function in glmtune.evaluate, print a summary.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from glmtune.cli.main import app
from glmtune.errors import InputError

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate checkpoints: classification reports, "
                                                  "generation metrics, LLM judge, comparisons.")
app.add_typer(eval_app, name="eval")
console = Console()


def print_whole(table) -> None:
    """On a terminal, fit the table to its width; piped or redirected (``> cmp.txt``, CI logs), print
    it at its natural width, where rich would fold it into 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement
    width = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    Console(width=max(width, console.width), file=console.file).print(table)


@eval_app.command("compare")
def compare(folders: List[Path] = typer.Argument(..., help="Eval output folders (each with metrics.json)."),
            baseline: Optional[Path] = typer.Option(None, "--baseline", help="Folder to diff every other against."),
            out: Optional[Path] = typer.Option(None, "--out", help="Also write the table as Markdown here.")):
    """One table across checkpoint evaluations (best per column in bold, deltas vs --baseline)."""
    from glmtune.evaluate.compare import compare_rows, markdown_table, rich_table
    from glmtune.io import write_text_atomic
    cmp = compare_rows(folders, baseline)
    print_whole(rich_table(cmp))
    if out:
        write_text_atomic(out, markdown_table(cmp))
        console.print(f"wrote {out}")


@eval_app.command("generate")
def generate(data: Path = typer.Option(..., "--data", help='JSONL rows {"prediction": str, "references": [str, ...]}.'),
             out: Path = typer.Option(..., "--out", help="Output folder: metrics.json, per_sample.jsonl, report.md."),
             metrics: str = typer.Option("bleu,rouge,meteor,ter", "--metrics", help="Comma list of bleu,rouge,meteor,ter."),
             tokenize: str = typer.Option("auto", "--tokenize",
                                          help="jieba | char | whitespace | auto (jieba if any CJK text, else sacrebleu 13a).")):
    """BLEU-1..4, ROUGE-1..4/L, METEOR, TER for open answers (scores on a 0-1 scale)."""
    from glmtune.evaluate.generation import generation_report_files
    m = generation_report_files(data, out, metrics.split(","), tokenize)
    keys = [k for k in m if k.startswith(("bleu_", "rouge_")) or k in ("meteor", "ter")]
    console.print(" ".join(f"{k}={m[k]:.4f}" if m[k] is not None else f"{k}=n/a" for k in keys))
    for name, why in (m.get("unavailable") or {}).items():
        console.print(f"[yellow]{name} unavailable:[/] {why}", soft_wrap=True)
    console.print(f"tokenize={m['tokenize']}  wrote {out}/metrics.json")


@eval_app.command("judge")
def judge(data: Path = typer.Option(..., "--data", help='JSONL rows {"prediction", "question"?, "reference"?, "reference_score"?}.'),
          out: Path = typer.Option(..., "--out", help="Output folder: judgments.jsonl, failed_judgments.jsonl, metrics.json."),
          url: str = typer.Option(..., "--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
          model: str = typer.Option(..., "--model", help="Judge model name sent to the endpoint."),
          rubric: str = typer.Option("general", "--rubric", help="Preset (general: 1-10, ielts: bands 5.0-8.0) or a template file."),
          api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Env var holding the API key (optional for local servers)."),
          min_score: Optional[float] = typer.Option(None, "--min-score", help="Override the rubric's lowest valid score."),
          max_score: Optional[float] = typer.Option(None, "--max-score", help="Override the rubric's highest valid score."),
          step: Optional[float] = typer.Option(None, "--step", help="Override the score step (IELTS: 0.5)."),
          retries: int = typer.Option(2, "--retries", help="Extra attempts after a malformed reply before marking it failed."),
          workers: int = typer.Option(4, "--workers", help="Parallel requests."),
          timeout: float = typer.Option(60.0, "--timeout", help="Seconds per request.")):
    """LLM-as-judge with a rubric; with reference_score also MSE, MAE, Pearson and QWK."""
    from glmtune.evaluate.judge import OpenAIChatJudge, Scale, judge_report_files, load_judge_file, resolve_rubric
    template, scale = resolve_rubric(rubric)
    scale = scale or Scale(1, 10, 1)
    scale = Scale(min_score if min_score is not None else scale.lo, max_score if max_score is not None else scale.hi,
                  step if step is not None else scale.step)
    if scale.step <= 0 or scale.hi < scale.lo:
        raise InputError(f"invalid score scale {scale}", field="--min-score/--max-score/--step")
    rows = load_judge_file(data)
    client = OpenAIChatJudge(url, model, api_key=os.environ.get(api_key_env), timeout=timeout)
    try:
        m = judge_report_files(rows, client, template, scale, out, retries=retries, workers=workers,
                               extra={"judge_model": model, "rubric": rubric})
    finally:
        client.close()
    console.print(f"scored {m['n_scored']}/{m['n_samples']} (failed {m['n_failed']}), mean {m['mean_score']}")
    if "qwk" in m:
        console.print(f"vs reference: MAE={m['mae']:.4f} MSE={m['mse']:.4f} pearson={m['pearson']} QWK={m['qwk']}")
    console.print(f"wrote {out}/metrics.json")
    if m["n_samples"] and not m["n_scored"]:  # a run with no score at all failed, whatever was written
        from glmtune.errors import GlmtuneError
        raise GlmtuneError(f"every judgment failed ({m['n_failed']} of {m['n_samples']}); the reasons are in "
                           f"{out}/failed_judgments.jsonl. Fix: check --url, --model and the judge's replies")


@eval_app.command("classify")
def classify(model: Path = typer.Option(..., "--model", help="Model folder (merged checkpoint or base)."),
             data: Path = typer.Option(..., "--data", help="Test data with labels: a file in any format `glmtune data convert` reads (PATH:FORMAT names one), or a name in ./datasets.yaml."),
             out: Path = typer.Option(..., "--out", help="Output folder: metrics.json, report.md, confusion_matrix.png, ..."),
             adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA adapter folder."),
             labels: Optional[Path] = typer.Option(None, "--labels", help="Label list or id->name mapping (YAML/JSON/txt); default: labels in the data."),
             quick: Optional[int] = typer.Option(None, "--quick", help="Evaluate only N samples, stratified by label."),
             batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch (halved on out-of-memory)."),
             mode: str = typer.Option("constrained", "--mode", help="constrained (score each label, never invalid) | generate (greedy + parse)."),
             truncate_side: str = typer.Option("left", "--truncate-side", help="left: keep the end of the dialogue; right: keep the start."),
             max_len: Optional[int] = typer.Option(None, "--max-len", help="Truncate prompts to this many tokens."),
             decision: str = typer.Option("greedy", "--decision", help="constrained mode: greedy (most likely token at each branch of the label trie; agrees with greedy generation) | likelihood (most likely label)."),
             liger: str = typer.Option("auto", "--liger", help="liger-kernel's RMSNorm/SwiGLU, as the training config's speed.liger: auto (on CUDA when installed) | all | none."),
             scoring: str = typer.Option("decisive", "--scoring", help="constrained mode: decisive (score each answer up to the token that sets it apart; fast) | full (whole answer + end token).")):
    """Classification report: accuracy, F1, per-class table, confusion matrix, failed predictions."""
    from glmtune.evaluate.classify import classify_report
    m = classify_report(model, data, out, adapter=adapter, labels=labels, quick=quick, batch_size=batch_size,
                        mode=mode, truncate_side=truncate_side, max_len=max_len,
                        decision=decision, scoring=scoring, liger=liger)
    sps = m.get("samples_per_s")
    console.print(f"mode={mode} n={m['n_samples']} accuracy={m['accuracy']:.4f} f1_macro={m['f1_macro']:.4f} "
                  f"invalid={m['invalid_count']} truncated={m['truncated']} "
                  f"samples/s={sps if sps is None else round(sps, 2)}")
    console.print(f"wrote {out}/metrics.json")
