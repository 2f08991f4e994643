"""`glmtune train CONFIG.yaml` and `glmtune export`: thin wrappers over glmtune.train."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from glmtune.cli import launch_options as opts
from glmtune.cli.main import app

console = Console(stderr=True)


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Training config YAML (see configs/ for presets)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: --set train.lr=1e-4 (repeatable)."),
    resume: Optional[str] = typer.Option(None, help="Continue exactly from `latest` (newest checkpoint in "
                                                    "output.dir) or a checkpoint-<step> folder."),
    nproc: int = opts.NPROC,
    nnodes: Optional[int] = opts.NNODES,
    node_rank: Optional[int] = opts.NODE_RANK,
    master_addr: Optional[str] = opts.MASTER_ADDR,
    master_port: Optional[int] = opts.MASTER_PORT,
    dist_timeout: int = opts.DIST_TIMEOUT,
    accelerate_config: Optional[str] = opts.ACCELERATE_CONFIG,
    overwrite: bool = typer.Option(False, help="Delete the previous run in a non-empty output.dir "
                                               "(checkpoints, final, metrics) and start over."),
    explain: bool = typer.Option(False, help="Print every config key with its default and meaning, then exit."),
) -> None:
    """Fine-tune a model (lora, qlora, prefix = P-Tuning v2, full, freeze) as CONFIG says."""
    from glmtune.errors import ConfigError
    from glmtune.train.config import explain as explain_cfg
    from glmtune.train.config import load_config

    if explain:
        typer.echo(explain_cfg())
        return
    if config is None:
        raise ConfigError("no config file given", fix="glmtune train configs/<preset>.yaml (or --explain)")
    from glmtune.train.launch import (check_flags_for_role, collective_errors, launch_role, prepares_output,
                                      resolve_nodes, world_size)

    role = launch_role()  # glmtune launches / a child of glmtune's launcher / under torchrun or accelerate launch
    check_flags_for_role(role, nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                         master_port=master_port)
    sets = list(set_ or [])
    cfg = load_config(config, sets)  # fail fast, before starting N processes
    nodes = resolve_nodes(nnodes, node_rank, master_addr, master_port) if role == "launcher" else None
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", field="--overwrite",
                          fix="--resume to continue the run, --overwrite to start over")
    if prepares_output(role, overwrite, nodes):  # one process decides; the others find the folder ready
        from glmtune.train.checkpoint import prepare_output_dir
        prepare_output_dir(cfg, resume=resume, overwrite=overwrite, processes=world_size(role, nproc, nodes))
    opts.launch_if_needed(["train"], config, sets, resume, role=role, nproc=nproc, nodes=nodes,
                          accelerate_config=accelerate_config, dist_timeout=dist_timeout, console=console)
    from glmtune.train import run_training

    with collective_errors():  # a node that died mid-run: one line, not a gloo/NCCL traceback
        result = run_training(cfg, resume=resume)  # the config parsed above, not the file read again
    if result.metrics or os.environ.get("RANK", "0") == "0":
        console.print(f"[green]done[/]: {result.steps} steps, final loss {result.final_loss:.4f}"
                      + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                      + f"\nweights: {result.adapter_path}\nmetrics: {result.output_dir / 'metrics.jsonl'}")


@app.command("export")
def export_cmd(
    adapter: Path = typer.Option(..., help="Adapter folder (e.g. OUT/final) or a full/freeze checkpoint."),
    out: Path = typer.Option(..., help="Model folder to write."),
    base: Optional[Path] = typer.Option(None, help="Base model folder (default: the one recorded in the adapter)."),
    shard_size: str = typer.Option("2GB", help="Largest safetensors shard, e.g. 2GB or 500MB."),
) -> None:
    """Merge a LoRA adapter into its base: sharded safetensors + tokenizer + glmtune.json."""
    from glmtune.train.export import export_merged

    path = export_merged(base, adapter, out, shard_size=shard_size)
    console.print(f"[green]exported[/] {path}")
