"""`glmtune model ...`: bring model weights into glmtune's folder layout."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from glmtune.cli.main import app

model_app = typer.Typer(no_args_is_help=True, help="Import model weights (GGUF, remote-code ChatGLM) into glmtune model folders.")
app.add_typer(model_app, name="model")
console = Console(stderr=True)


@model_app.command("import-gguf")
def import_gguf_cmd(
    files: Optional[List[Path]] = typer.Argument(
        None, help="A .gguf file, or all raw parts of one in order (part01.bin part02.bin ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (HF layout + glmtune.json)."),
    dtype: str = typer.Option("bf16", help="Weight dtype of the folder: bf16 (half the size) or fp32."),
    template: str = typer.Option("auto", help="Template family; auto reads it from the GGUF's chat template "
                                              "(ChatML -> qwen, Llama-3 headers -> llama3)."),
    package: Optional[str] = typer.Option(None, help="Import a GGUF installed from PyPI instead of FILES: "
                                                     "smollm2 or qwen2.5-coder-0.5b."),
    verify: bool = typer.Option(True, help="Reload the folder with transformers and compare logits."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out folder."),
) -> None:
    """Dequantise a GGUF (llama.cpp / Ollama) into a normal Hugging Face model folder for fine-tuning."""
    from glmtune.errors import InputError
    from glmtune.models.gguf import find_packaged_gguf, import_gguf

    if bool(files) == bool(package):
        raise InputError("give either FILES or --package", fix="e.g. `glmtune model import-gguf model.gguf --out "
                                                               "models/m` or `--package smollm2 --out models/m`")
    paths = find_packaged_gguf(package) if package else list(files)
    # Plain step lines rather than a spinner: transformers draws its own tqdm bars while dequantising.
    report = import_gguf(paths, out, dtype=dtype, template=template, verify=verify, overwrite=overwrite,
                         on_step=lambda msg: console.print(f"[cyan]·[/] {msg}"))
    console.print(_summary(report))


@model_app.command("import-chatglm")
def import_chatglm_cmd(
    src: Path = typer.Argument(..., help="A ChatGLM2-6B / ChatGLM3-6B / glm-4-9b-chat folder (config.json, weight "
                                         "shards, tokenizer.model); its Python files are never run."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (native GlmForCausalLM + glmtune.json)."),
    dtype: str = typer.Option("bf16", help="Weight dtype of the folder: bf16 or fp32."),
    template: str = typer.Option("auto", help="chatglm2, chatglm3 or glm4; auto reads it from the tokenizer "
                                              "and the configs' names."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out folder."),
) -> None:
    """Convert a remote-code ChatGLM checkpoint into a native transformers folder (no remote code)."""
    from glmtune.models.chatglm_import import import_chatglm

    report = import_chatglm(src, out, dtype=dtype, template=template, overwrite=overwrite,
                            on_step=lambda msg: console.print(f"[cyan]·[/] {msg}"), stop_ids_for=template_stop_ids)
    table = Table(title=f"imported {report.out_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in (("source", str(report.source)), ("architecture", "GlmForCausalLM"),
                       ("template", report.family), ("parameters", f"{report.num_parameters / 1e6:.1f} M"),
                       ("dtype", report.dtype), ("rope_theta", f"{report.rope_theta:g}"),
                       ("stop ids", ", ".join(map(str, report.stop_ids))),
                       ("source tensors", f"{len(report.used)}, each used once"),
                       ("weights", ", ".join(report.weight_files)), ("time", f"{report.seconds:.0f} s")):
        table.add_row(key, value)
    console.print(table)


def _summary(report) -> Table:
    table = Table(title=f"imported {report.out_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    src = report.sources[0].name if len(report.sources) == 1 else f"{len(report.sources)} parts joined"
    table.add_row("source", src)
    table.add_row("architecture", report.architecture)
    table.add_row("parameters", f"{report.num_parameters / 1e6:.1f} M")
    table.add_row("dtype", report.dtype)
    table.add_row("template", report.template)
    table.add_row("chat template kept", "yes" if report.chat_template_kept else "no")
    table.add_row("weights", ", ".join(report.weight_files))
    if report.max_abs_logit_diff is not None:
        ok = "[green]same argmax[/]" if report.same_argmax else "[red]argmax differs[/]"
        table.add_row("max |logit diff| vs GGUF", f"{report.max_abs_logit_diff:.3g} ({ok})")
    for note in report.notes:
        table.add_row("note", f"[yellow]{note}[/]")
    table.add_row("time", f"{report.seconds:.0f} s")
    return table


def template_stop_ids(family: str, tokenizer) -> list[int]:
    """The ids that end a reply for a chat-template family (what an imported folder's generation config holds)."""
    from glmtune.templates import get_template

    return get_template(family).stop_token_ids(tokenizer)
