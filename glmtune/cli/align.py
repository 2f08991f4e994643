"""`glmtune align {rm,dpo,kto,orpo,simpo,grpo,ppo} CONFIG.yaml`: thin wrappers over glmtune.align.run_alignment."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from glmtune.cli import launch_options as opts
from glmtune.cli.main import app

console = Console(stderr=True)
align_app = typer.Typer(help="Align a model on TRL: reward model (rm), DPO, KTO, ORPO, SimPO, GRPO, PPO (TRL's RLOO).",
                        invoke_without_command=True)
app.add_typer(align_app, name="align")

CONFIG = typer.Argument(None, help="Alignment config YAML (glmtune train's sections + align:).")
SET = typer.Option(None, "--set", help="Override a key: --set align.beta=0.2 (repeatable).")
RESUME = typer.Option(None, help="Continue from `latest` (newest checkpoint in output.dir) or a checkpoint folder.")


@align_app.callback()
def align_group(ctx: typer.Context,
                explain: bool = typer.Option(False, help="Print every config key with its default and meaning.")) -> None:
    """Reward model, DPO, KTO, ORPO, SimPO, GRPO and PPO from the same configs, templates and adapters as `glmtune train`."""
    if explain:
        from glmtune.align.config import AlignConfig
        from glmtune.train.config import explain as explain_cfg
        typer.echo(explain_cfg(AlignConfig))
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _run(algorithm: str, config: Optional[Path], sets: Optional[List[str]], resume: Optional[str], launch: dict) -> None:
    from glmtune.errors import ConfigError
    from glmtune.train.launch import check_flags_for_role, collective_errors, launch_role, resolve_nodes
    if config is None:
        raise ConfigError("no config file given", fix=f"glmtune align {algorithm} CONFIG.yaml (or glmtune align --explain)")
    role = launch_role()
    nproc, accel, timeout = launch.pop("nproc"), launch.pop("accelerate_config"), launch.pop("dist_timeout")
    check_flags_for_role(role, nproc=nproc, **launch)
    if role == "launcher" and (nproc > 1 or launch["nnodes"] not in (None, 1)):
        from glmtune.align.config import check_for, load_align_config
        check_for(load_align_config(config, list(sets or [])), algorithm, str(config))  # fail fast, before N processes
    if role == "launcher":  # TRL's trainers run under accelerate launch as they are: DDP / DeepSpeed / FSDP
        opts.launch_if_needed(["align", algorithm], config, list(sets or []), resume, role=role, nproc=nproc,
                              nodes=resolve_nodes(**launch), accelerate_config=accel, dist_timeout=timeout,
                              console=console)
    from glmtune.align.run import run_alignment
    with collective_errors():
        result = run_alignment(algorithm, config, overrides=list(sets or []), resume=resume, console=console)
    if os.environ.get("RANK", "0") != "0":
        return  # one summary per run, from rank 0 (which has the metrics)
    last = next((r for r in reversed(result.metrics) if "loss" in r), {})
    console.print(f"[green]done[/]: {result.steps} steps" + (f", last loss {last['loss']:.4f}" if last else "")
                  + f"\nweights: {result.adapter_path}\nmetrics: {result.output_dir / 'metrics.jsonl'}")


ALGORITHMS = {
    "rm": "Train a reward model (scalar head) on preference pairs; use it as a GRPO/PPO reward.",
    "dpo": "Direct preference optimisation on preference pairs (or gold x bad answers); pairs packed, prompt once.",
    "kto": "Kahneman-Tversky optimisation: chosen answers desirable, rejected undesirable (unpaired; TRL KTOTrainer).",
    "orpo": "Odds-ratio preference optimisation: SFT + preference in one loss, no reference model (TRL ORPOTrainer).",
    "simpo": "SimPO: length-normalised preference margin, no reference model (TRL CPOTrainer, loss simpo).",
    "grpo": "Group relative policy optimisation with the rewards of align.rewards.",
    "ppo": "PPO-style RL with align.rewards (TRL 1.x: RLOOTrainer, no value head).",
}


def _command(algorithm: str):
    def command(config: Optional[Path] = CONFIG, set_: Optional[List[str]] = SET,
                resume: Optional[str] = RESUME, nproc: int = opts.NPROC, nnodes: Optional[int] = opts.NNODES,
                node_rank: Optional[int] = opts.NODE_RANK, master_addr: Optional[str] = opts.MASTER_ADDR,
                master_port: Optional[int] = opts.MASTER_PORT, dist_timeout: int = opts.DIST_TIMEOUT,
                accelerate_config: Optional[str] = opts.ACCELERATE_CONFIG) -> None:
        _run(algorithm, config, set_, resume, dict(nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                                                    master_addr=master_addr, master_port=master_port,
                                                    dist_timeout=dist_timeout, accelerate_config=accelerate_config))
    command.__doc__ = ALGORITHMS[algorithm]
    return command


for _name in ALGORITHMS:
    align_app.command(_name)(_command(_name))
