"""Several processes, on one machine or several: the `accelerate launch` that `glmtune train --nproc N`
(and `glmtune align`) runs, and the checks that make N processes on M nodes one run.

Who launches (one of three, decided by `launch_role`):
  * glmtune itself: `glmtune train CFG --nproc 8 --nnodes 2 --node-rank R --master-addr HOST`, the same
    line on every node (or once per node under `srun`, which supplies the node values). It runs
    accelerate's launcher (torchrun underneath: static rendezvous at HOST:PORT) in this process.
  * an external launcher (`accelerate launch -m glmtune ...`, `torchrun -m glmtune ...`, DeepSpeed's
    runner): the processes arrive with LOCAL_RANK set and simply train.
  * a child of glmtune's launcher (GLMTUNE_LAUNCH set): trains, and knows the flags it was started with.

Data across nodes: every process reads the same files (on shared storage) and encodes all records
itself; the order is a pure function of (seed, step) and each process takes its share of a global
micro-batch (glmtune.train.data.BatchStream). No rank-0 cache: `check_one_run` compares a hash of the
encoded examples, of the config and of the launch flags over all processes before the model loads.

The accelerate / DeepSpeed / FSDP presets ship inside the package (glmtune/resources/accelerate), so
`--accelerate-config ddp` works from a non-editable install as from a checkout.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from glmtune.errors import ConfigError, DistributedError

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "resources" / "accelerate"
ACCELERATE_PRESETS = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
DEFAULT_PORT = 29517
# How long a process waits for the others (the rendezvous at start, then every collective) before the
# run stops with an error: torch's own default for gloo, long enough for rank 0 to write a large
# checkpoint while the others wait at the barrier.
DEFAULT_TIMEOUT_S = 1800
LAUNCH_ENV = "GLMTUNE_LAUNCH"        # set by glmtune's launcher for its children: the flags, as JSON
TIMEOUT_ENV = "GLMTUNE_DIST_TIMEOUT"  # seconds; read by make_accelerator (also under external launchers)


# --------------------------------------------------------------------------------------------------
# which nodes: flags, then the environment (MASTER_ADDR, NODE_RANK, ...), then SLURM under srun

@dataclass(frozen=True)
class Nodes:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_PORT
    source: str = "flags"            # where nnodes/node_rank came from, for messages

    def describe(self) -> str:
        return (f"node {self.node_rank} of {self.nnodes}, master {self.master_addr}:{self.master_port}"
                f" (from {self.source})")


def first_host(nodelist: str) -> str:
    """SLURM's compact node list -> its first host: 'gpu[07-09,12],cpu1' -> 'gpu07' (zero padding kept).

    `scontrol show hostnames` does this on a SLURM machine; parsed here so `srun glmtune train ...`
    needs no shell around it."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    # each bracket (there may be several: rack[1-2]-n[01-04]) -> its first number
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number", field=name) from None


def resolve_nodes(nnodes: int | None = None, node_rank: int | None = None, master_addr: str | None = None,
                  master_port: int | None = None, env: dict | None = None) -> Nodes:
    """The node values for this launcher: a flag wins, then NNODES / NODE_RANK / MASTER_ADDR /
    MASTER_PORT, then SLURM's step variables (only inside `srun`: SLURM_STEP_NUM_NODES, SLURM_NODEID,
    the first host of SLURM_STEP_NODELIST). Checked here, before anything starts."""
    env = os.environ if env is None else env
    source = "flags" if nnodes is not None or node_rank is not None else None
    slurm = "SLURM_STEP_NUM_NODES" in env  # inside srun (an sbatch script alone is not a step on every node)
    if nnodes is None and "NNODES" in env:
        nnodes, source = _int(env["NNODES"], "NNODES"), source or "environment"
    if node_rank is None and "NODE_RANK" in env:
        node_rank, source = _int(env["NODE_RANK"], "NODE_RANK"), source or "environment"
    if slurm:
        if nnodes is None:
            nnodes, source = _int(env["SLURM_STEP_NUM_NODES"], "SLURM_STEP_NUM_NODES"), source or "SLURM"
        if node_rank is None and "SLURM_NODEID" in env:
            node_rank = _int(env["SLURM_NODEID"], "SLURM_NODEID")
        tasks = env.get("SLURM_STEP_NUM_TASKS")
        if tasks and nnodes and _int(tasks, "SLURM_STEP_NUM_TASKS") != nnodes:
            raise ConfigError(f"srun started {tasks} tasks on {nnodes} nodes, but glmtune starts the processes "
                              "of a node itself (--nproc per node)", field="srun --ntasks-per-node",
                              fix="srun --ntasks-per-node=1 glmtune train ... --nproc <GPUs per node>")
    nnodes = 1 if nnodes is None else nnodes
    node_rank = 0 if node_rank is None else node_rank
    if master_addr is None:
        master_addr = env.get("MASTER_ADDR") or None
        if master_addr is None and slurm:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            master_addr = first_host(nodelist) if nodelist else None
    if master_port is None:
        port = env.get("MASTER_PORT") or env.get("GLMTUNE_MASTER_PORT")
        master_port = _int(port, "MASTER_PORT") if port else DEFAULT_PORT
    if nnodes < 1:
        raise ConfigError(f"--nnodes {nnodes}: a run needs at least one node", field="--nnodes")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is not one of the {nnodes} nodes (0..{nnodes - 1}; "
                          f"values from {source or 'flags'})",
                          field="--node-rank", fix="number the nodes 0, 1, ... --nnodes - 1; node 0 is the master")
    if not 0 < master_port < 65536:
        raise ConfigError(f"--master-port {master_port} is not a TCP port", field="--master-port")
    if nnodes > 1 and not master_addr:
        raise ConfigError(f"{nnodes} nodes need the address of node 0", field="--master-addr",
                          fix="--master-addr HOST (or MASTER_ADDR=HOST): a name or IP of node 0 that every node reaches")
    return Nodes(nnodes, node_rank, master_addr or "127.0.0.1", master_port, source or "flags")


# --------------------------------------------------------------------------------------------------
# who runs this process

def launch_role(env: dict | None = None) -> str:
    """'launcher' (start processes, or train alone), 'child' (of glmtune's launcher) or 'external'
    (started by accelerate launch / torchrun / DeepSpeed: LOCAL_RANK without glmtune's marker)."""
    env = os.environ if env is None else env
    if "LOCAL_RANK" not in env:
        return "launcher"
    return "child" if LAUNCH_ENV in env else "external"


def check_flags_for_role(role: str, *, nproc: int, nnodes: int | None, node_rank: int | None,
                         master_addr: str | None, master_port: int | None) -> None:
    """Under an external launcher the processes already exist: glmtune's launch flags would be ignored."""
    if role != "external":
        return
    given = [f for f, v in (("--nproc", nproc != 1), ("--nnodes", nnodes is not None),
                            ("--node-rank", node_rank is not None), ("--master-addr", master_addr is not None),
                            ("--master-port", master_port is not None)) if v]
    if given:
        raise ConfigError(f"{', '.join(given)} given to a process that an external launcher started "
                          "(LOCAL_RANK is set)", field=given[0],
                          fix="give the processes and nodes to that launcher (torchrun --nnodes/--nproc-per-node, "
                              "accelerate launch --num_machines/--num_processes), or drop the launcher and use glmtune's flags")


def prepares_output(role: str, overwrite: bool, nodes: Nodes | None) -> bool:
    """Whether this process decides what happens to output.dir (check, --overwrite) before training.

    glmtune's launcher: on node 0 only (the others cannot write before node 0 has joined the
    rendezvous, and two nodes clearing one shared folder would race). External launcher: every process
    checks (nothing is written before all have joined), except that only rank 0 clears with --overwrite."""
    if role == "child":
        return False
    if role == "launcher":
        return nodes is None or nodes.node_rank == 0
    return not overwrite or os.environ.get("RANK", "0") == "0"


def world_size(role: str, nproc: int, nodes: Nodes | None) -> int | None:
    """Processes of the run, all nodes together, as the process preparing output.dir knows it."""
    if role == "launcher":
        return nproc * (nodes.nnodes if nodes else 1)
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


# --------------------------------------------------------------------------------------------------
# the launch line

def accelerate_config_path(name_or_path: str) -> Path:
    """A preset name (ddp, deepspeed_zero2, deepspeed_zero3, fsdp) -> its packaged YAML; else a path.

    Checked before N processes start (a missing file or an uninstalled DeepSpeed would otherwise fail
    in every process)."""
    return _read_accelerate_config(name_or_path)[0]


def _read_accelerate_config(name_or_path: str) -> tuple[Path, dict]:
    import importlib.util

    import yaml

    path = ACCELERATE_DIR / f"{name_or_path}.yaml" if name_or_path in ACCELERATE_PRESETS else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no accelerate config '{name_or_path}'", field="--accelerate-config",
                          fix=f"use one of {', '.join(ACCELERATE_PRESETS)} or a path to an accelerate YAML")
    try:
        conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"not a readable YAML file ({type(e).__name__})", file=path,
                          field="--accelerate-config") from None
    if not isinstance(conf, dict):
        raise ConfigError("an accelerate config must be a YAML mapping", file=path, field="--accelerate-config")
    if conf.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("this accelerate config uses DeepSpeed, which is not installed", file=path,
                          field="--accelerate-config", fix="pip install deepspeed (on the GPU machine), or use ddp / fsdp")
    return path, conf


def accelerate_command(glmtune_args: list[str], nproc: int, accel: str | None, nodes: Nodes | None = None,
                       timeout_s: int = DEFAULT_TIMEOUT_S) -> list[str]:
    """The `accelerate launch` line: `nproc` glmtune processes on this node, `nodes.nnodes` nodes in all.

    `glmtune_args`: the command the processes run (`train CFG --set ...`). accelerate's
    --num_processes counts the processes of all machines. Without CUDA, accelerate's `--multi_gpu`
    launcher (torchrun) still starts the processes and they join a gloo group, which is how
    multi-process and multi-node runs are tested on CPU. A node's values in the accelerate YAML
    (num_machines, machine_rank, main_process_ip/port) are replaced by glmtune's; a YAML for several
    machines must agree with --nnodes.
    """
    nodes = nodes or resolve_nodes(1, 0, None, None)
    conf: dict = {}
    path = None
    if accel:
        path, conf = _read_accelerate_config(accel)
        yaml_machines = int(conf.get("num_machines") or 1)
        if yaml_machines > 1 and yaml_machines != nodes.nnodes:
            raise ConfigError(f"the accelerate config is for {yaml_machines} machines, glmtune runs on "
                              f"{nodes.nnodes} ({nodes.describe()})", file=path, field="num_machines",
                              fix=f"--nnodes {yaml_machines}, or set num_machines: 1 (glmtune's flags give the nodes)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(nproc * nodes.nnodes), "--num_machines", str(nodes.nnodes),
           "--machine_rank", str(nodes.node_rank), "--main_process_ip", nodes.master_addr,
           "--main_process_port", str(nodes.master_port),
           # static rendezvous at master_addr:port; a node that is missing or cannot reach it stops
           # after timeout_s instead of waiting forever
           "--same_network", "--rdzv_backend", "static", "--rdzv_conf", f"timeout={int(timeout_s)}",
           "--max_restarts", "0"]
    if path is not None:
        cmd += ["--config_file", str(path)]
        ds_launcher = (conf.get("deepspeed_config") or {}).get("deepspeed_multinode_launcher")
        if nodes.nnodes > 1 and conf.get("distributed_type") == "DEEPSPEED":
            if ds_launcher is None:
                # glmtune runs on every node: DeepSpeed's default (pdsh over ssh from node 0) would start
                # the other nodes' processes a second time
                cmd += ["--deepspeed_multinode_launcher", "standard"]
            elif ds_launcher != "standard" and nodes.node_rank != 0:
                raise ConfigError(f"deepspeed_multinode_launcher: {ds_launcher} starts every node's processes from "
                                  "node 0 (the hostfile's hosts, over ssh)", file=path,
                                  field="deepspeed_config.deepspeed_multinode_launcher",
                                  fix="run glmtune on node 0 only, or set deepspeed_multinode_launcher: standard "
                                      "to run the same command on every node")
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ["-m", "glmtune.cli.main", *glmtune_args]


def glmtune_args(command: list[str], config: Path, sets: list[str], resume: str | None) -> list[str]:
    """What each process runs: `train CFG --set k=v ... [--resume R]` (or `align dpo CFG ...`)."""
    args = [*command, str(config)]
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    return args


def launch(cmd: list[str], *, nproc: int, nodes: Nodes, timeout_s: int, console=None) -> int:
    """Run accelerate's launcher in this process; return the exit status for this node.

    In this process rather than as `python -m accelerate.commands.launch` so a failure ends with one
    line: a worker's own error is printed by that worker; torchrun's report of it (a traceback of
    the elastic agent) and a rendezvous that timed out become one `error:` line here."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    args = launch_command_parser().parse_args(cmd[3:])  # after `python -m accelerate.commands.launch`
    os.environ[LAUNCH_ENV] = json.dumps({"nproc": nproc, **asdict(nodes)})
    os.environ[TIMEOUT_ENV] = str(int(timeout_s))
    if console is not None:
        console.print(f"[cyan]·[/] {nodes.describe()}: accelerate launch {' '.join(cmd[3:])}")
    try:
        launch_command(args)
    except ChildFailedError as e:  # a worker exited non-zero (it printed its own error)
        rank, failure = min(e.failures.items())
        code = failure.exitcode if failure.exitcode > 0 else 1
        raise DistributedError(f"node {nodes.node_rank}: process rank {rank} exited with status {failure.exitcode}"
                               + (" (killed by a signal)" if failure.exitcode < 0 else "") + "; its error is above",
                               exit_code=code) from None
    except subprocess.CalledProcessError as e:  # DeepSpeed's runner (hostfile): it printed what failed
        raise DistributedError(f"node {nodes.node_rank}: {Path(e.cmd[0]).name} exited with status {e.returncode}; "
                               "its error is above", exit_code=e.returncode if e.returncode > 0 else 1) from None
    except (DistError, RendezvousError) as e:  # the static rendezvous timed out or could not connect
        raise DistributedError(
            f"node {nodes.node_rank} of {nodes.nnodes}: the nodes did not all meet (or lost the rendezvous) at "
            f"{nodes.master_addr}:{nodes.master_port} within {timeout_s} s ({_first_line(e)})",
            fix="start the same command on every node (node 0 listens, the others connect), check "
                "--master-addr/--master-port are node 0's and reachable, --nnodes is the same everywhere; "
                "--dist-timeout S waits longer") from None
    except ConnectionError as e:  # accelerate: node 0's port is taken
        raise DistributedError(f"node {nodes.node_rank}: {_first_line(e)}",
                               fix="choose another --master-port (the same on every node)") from None
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# --------------------------------------------------------------------------------------------------
# inside each process: one run, or a clear stop

def dist_timeout_s(env: dict | None = None) -> int:
    env = os.environ if env is None else env
    value = env.get(TIMEOUT_ENV)
    return _int(value, TIMEOUT_ENV) if value else DEFAULT_TIMEOUT_S


def process_group_kwargs() -> list:
    """accelerate kwargs handlers: the collective timeout (GLMTUNE_DIST_TIMEOUT, default 1800 s)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout_s()))]


def examples_digest(examples) -> str:
    """sha256 over every encoded example's token ids and labels, in order (what training reads)."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for e in examples:
        h.update(array("q", e.input_ids).tobytes())
        h.update(array("q", e.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()


def run_identity(cfg, examples, *, rank: int, world: int, env: dict | None = None) -> dict:
    """What must be equal on every process of one run (and where this process is, for the message)."""
    import socket
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if env is None else env
    try:
        installed = version("glmtune")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        installed = "not installed"
    flat = _flatten(cfg.model_dump(mode="json"))
    return {"rank": rank, "world": world, "host": socket.gethostname(), "glmtune": installed,
            "launch": json.loads(env[LAUNCH_ENV]) if LAUNCH_ENV in env else None,
            "config": flat, "data": examples_digest(examples), "examples": len(examples)}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _where(ident: dict) -> str:
    node = f", node {ident['launch']['node_rank']}" if ident.get("launch") else ""
    return f"rank {ident['rank']} ({ident['host']}{node})"


def identity_mismatch(idents: list[dict]) -> str | None:
    """The first way the processes disagree (launch flags, world size, config keys, version, data), or None."""
    ref = idents[0]
    for other in idents:
        la, lb = ref.get("launch"), other.get("launch")
        if la and lb:
            for key in ("nnodes", "nproc", "master_addr", "master_port"):
                if la[key] != lb[key]:
                    return (f"{_where(other)} was started with {key}={lb[key]!r}, {_where(ref)} with {la[key]!r}")
        if lb and lb["nnodes"] * lb["nproc"] != other["world"]:
            return (f"{_where(other)} was started for {lb['nnodes']} node(s) x {lb['nproc']} process(es), "
                    f"but the run has {other['world']} processes: another node was started with other --nnodes/--nproc")
        diff = [k for k in sorted(set(ref["config"]) | set(other["config"]))
                if ref["config"].get(k) != other["config"].get(k)]
        if diff:
            shown = "; ".join(f"{k}: {other['config'].get(k)!r} vs {ref['config'].get(k)!r}" for k in diff[:4])
            return f"{_where(other)} has another config than {_where(ref)} ({shown})"
        if other["glmtune"] != ref["glmtune"]:
            return f"{_where(other)} runs glmtune {other['glmtune']}, {_where(ref)} {ref['glmtune']}"
        if other["data"] != ref["data"]:
            return (f"{_where(other)} encoded other training data than {_where(ref)} ({other['examples']} vs "
                    f"{ref['examples']} examples, or the same count with other tokens): the data files or the "
                    "tokenizer differ between nodes")
    return None


def check_one_run(accelerator, cfg, examples) -> None:
    """Every process trains the same config on the same encoded data with the launch flags of the
    others, or every process stops with the same one-line error (one all-gather, before the model loads)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    mine = run_identity(cfg, examples, rank=accelerator.process_index, world=accelerator.num_processes)
    problem = identity_mismatch(gather_object([mine]))
    if problem:
        raise ConfigError(f"the processes of this run disagree: {problem}",
                          fix="start every node with the same config file, --set overrides, data files, glmtune "
                              "version and --nnodes/--nproc/--master-addr/--master-port")


def check_shared_output(accelerator, out: Path, *, wait_s: float = 30.0) -> None:
    """output.dir must be one folder for all nodes: every process writes its RNG state into each
    checkpoint and a resume reads them back. Rank 0 writes a probe file; a process that does not see
    it within wait_s (network file systems show a new file after their attribute cache expires) stops
    the run, on every process, with one line."""
    if accelerator.num_processes == 1:
        return
    import secrets
    import socket
    import time

    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = out / f".tmp-shared-{token[0]}"
    if accelerator.is_main_process:
        probe.write_text("glmtune: every node must see this file\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    deadline = time.time() + wait_s
    while not (seen := probe.exists() or (out.is_dir() and probe.name in os.listdir(out))) and time.time() < deadline:
        time.sleep(0.5)
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} ({host})" for r, host, ok in views if not ok]
    if blind:
        raise ConfigError(f"output.dir {out} is not the same folder on every node: {', '.join(blind[:4])} "
                          f"did not see the file rank 0 wrote there within {wait_s:.0f} s", field="output.dir",
                          fix="put output.dir on storage every node mounts at the same path (NFS, Lustre, ...): "
                              "each process writes into the checkpoints")


# messages of a collective whose peer went away (gloo, NCCL) or timed out
_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|timed out|Timed out|NCCL communicator was aborted"
                   r"|ProcessGroupNCCL|Socket Timeout|Connection refused")


@contextlib.contextmanager
def collective_errors():
    """A collective that fails because another process died or hung becomes one `error:` line (exit 1)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        import torch.distributed as dist

        lost = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _LOST.search(str(e)))
        if not lost or not dist.is_initialized():
            raise
        raise DistributedError(
            f"rank {dist.get_rank()}: lost the other processes of the run ({_first_line(e)})",
            fix="a node died, was stopped or lost its network; when all nodes are up again, rerun the same "
                "command with --resume latest (on any number of nodes: README, 'Several machines')") from None
