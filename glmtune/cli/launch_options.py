"""The launch flags `glmtune train` and `glmtune align` share: processes per node, nodes, rendezvous.

One definition, so both commands say the same in --help and behave the same (glmtune.train.launch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

NPROC = typer.Option(1, help="Processes (GPUs) per node: N>1, or --nnodes>1, runs the command under `accelerate launch`.")
NNODES = typer.Option(None, help="Nodes in the run (default: $NNODES, SLURM's under srun, else 1); run the same "
                                  "command on every node.")
NODE_RANK = typer.Option(None, "--node-rank", help="This node's number, 0..nnodes-1; node 0 is the master "
                                                   "(default: $NODE_RANK, $SLURM_NODEID under srun, else 0).")
MASTER_ADDR = typer.Option(None, "--master-addr", help="Node 0's address, reachable from every node (default: "
                                                       "$MASTER_ADDR, the first SLURM node under srun).")
MASTER_PORT = typer.Option(None, "--master-port", help="Node 0's rendezvous port (default: $MASTER_PORT, else 29517).")
DIST_TIMEOUT = typer.Option(1800, "--dist-timeout", help="Seconds a process waits for the others (all nodes to "
                                                         "join, then each collective) before the run stops with an error.")
ACCELERATE_CONFIG = typer.Option(
    None, "--accelerate-config", help="With --nproc/--nnodes: ddp, deepspeed_zero2, deepspeed_zero3, fsdp "
                                      "(shipped in glmtune/resources/accelerate/) or a path to an accelerate YAML.")


def launch_if_needed(command: list[str], config: Path, sets: list[str], resume: Optional[str], *, role: str,
                     nproc: int, nodes, accelerate_config: Optional[str], dist_timeout: int, console) -> None:
    """As glmtune's launcher with several processes or nodes: start them and exit with this node's status."""
    if role != "launcher" or (nproc <= 1 and nodes.nnodes <= 1):
        return
    from glmtune.errors import ConfigError
    from glmtune.train.launch import accelerate_command, glmtune_args, launch

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: a node needs at least one process", field="--nproc")
    cmd = accelerate_command(glmtune_args(command, config, sets, resume), nproc, accelerate_config, nodes,
                             timeout_s=dist_timeout)
    raise typer.Exit(launch(cmd, nproc=nproc, nodes=nodes, timeout_s=dist_timeout, console=console))
