"""Two `glmtune train` launchers on 127.0.0.1 as two nodes x 1 process (gloo): the same losses as one
process over the same global batch (one node x 2 processes: tests/train/test_ddp.py, with the same
launch flags); a killed node stops the other within a bounded time, and `--resume latest` continues
on one node; nodes that cannot meet or that disagree stop with one line, never hang. Every subprocess
has a timeout and talks only to 127.0.0.1. About 120 CPU-seconds in all, most of it each process
importing torch/transformers/peft."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from math import isclose

import psutil
import pytest
import yaml

from glmtune.train import run_training
from glmtune.train.checkpoint import list_checkpoints, prepare_output_dir
from glmtune.train.monitor import read_metrics

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT_S = 240  # one launcher, start to end, on a loaded 2-core machine (typically 20-40 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(cfg, path):
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def node(config, rank: int, port: int, *extra, nnodes: int = 2, timeout_s: int = 60, log=None) -> subprocess.Popen:
    """One "node": `glmtune train` in its own session (so the test can kill the node's whole tree)."""
    cmd = [sys.executable, "-m", "glmtune", "train", str(config), "--nnodes", str(nnodes), "--node-rank", str(rank),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "--dist-timeout", str(timeout_s), *map(str, extra)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log or subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(procs, limit=LIMIT_S) -> list[tuple[int, str]]:
    """Wait for every process (bounded); a process still running at the limit is killed and fails the test."""
    out, deadline = [], time.time() + limit
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill_tree(p)
            _, err = p.communicate()
            raise AssertionError(f"a node was still running after {limit} s (a hang): {(err or '')[-2000:]}")
        out.append((p.returncode, err or ""))
    return out


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a node: the launcher and every process under it (torchrun starts workers in their own session)."""
    try:
        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def losses(out_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(out_dir / "metrics.jsonl") if "loss" in m]


@pytest.fixture(scope="module")
def killed_run(tiny_model, qa_file, tmp_path_factory):
    """One launch for both acceptance checks (each launched process costs seconds of imports):
    two nodes x 1 process (batch 2 each) train 10 steps, saving every 2; node 1 is killed once
    checkpoint-4 exists (steps 1-4 are logged)."""
    from glmtune.train.config import load_config

    tmp = tmp_path_factory.mktemp("multinode")

    def config(name, **train):
        raw = {"model": {"path": str(tiny_model), "dtype": "fp32"},
               "data": {"datasets": [str(qa_file)], "cutoff_len": 64}, "method": {"name": "lora", "r": 8, "alpha": 16},
               "train": {"max_steps": 10, "batch_size": 2, "lr": 1e-2, "scheduler": "constant", "seed": 0, **train},
               "output": {"dir": str(tmp / name), "plot": False, "tensorboard": False, "save_every": 2, "keep_last": 2}}
        return load_config(raw)

    nodes_yaml = write_config(config("nodes"), tmp / "nodes.yaml")
    port, out = free_port(), tmp / "nodes"
    log0 = open(tmp / "node0.log", "w+")
    n0, n1 = node(nodes_yaml, 0, port, log=log0), node(nodes_yaml, 1, port)
    deadline = time.time() + LIMIT_S
    while time.time() < deadline and n0.poll() is None and not any(p.name == "checkpoint-4" for p in list_checkpoints(out)):
        time.sleep(0.05)
    running = n0.poll() is None
    kill_tree(n1)
    killed_at = time.time()
    finish([n1], limit=30)
    (code0, _), = finish([n0], limit=90)  # gloo sees the peer's sockets close; NCCL would wait --dist-timeout
    stopped_s = time.time() - killed_at
    log0.seek(0)
    ref = run_training(config("ref", batch_size=4))  # one process, the same global batch, uninterrupted
    return {"config": config, "out": out, "running_at_kill": running, "code0": code0, "err0": log0.read(),
            "stopped_s": stopped_s, "before_kill": losses(out), "ref": [m["loss"] for m in ref.metrics if "loss" in m]}


def test_two_nodes_match_one_process(killed_run):
    ref, two_nodes = killed_run["ref"][:4], killed_run["before_kill"][:4]
    assert len(ref) == len(two_nodes) == 4, two_nodes
    # fp32 losses near 12: 1e-6 relative is a few float32 ulps (one process sums the four conversations'
    # token losses in one reduction, two processes in two)
    assert all(isclose(x, y, rel_tol=1e-6) for x, y in zip(ref, two_nodes)), (ref, two_nodes)


def test_a_killed_node_stops_the_other_and_resume_continues_on_one_node(killed_run):
    out, err = killed_run["out"], killed_run["err0"]
    assert killed_run["running_at_kill"], "the run ended (or never saved) before node 1 could be killed"
    assert killed_run["code0"] != 0 and killed_run["stopped_s"] < 90, err[-3000:]
    assert "error: rank 0: lost the other processes of the run" in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("error: node 0: process rank 0 exited with status"), err[-2000:]
    assert not (out / "final").exists()

    # resume on one node, one process, the same global micro-batch (2 processes x 2 -> 1 x 4)
    cfg = killed_run["config"]("nodes", batch_size=4)
    prepare_output_dir(cfg, resume="latest", overwrite=False, processes=1)  # what `glmtune train --resume` checks
    resumed = run_training(cfg, resume="latest")
    assert [m["step"] for m in resumed.metrics if "loss" in m] == list(range(1, 11))
    a, b = killed_run["ref"], losses(out)
    assert len(a) == len(b) == 10 and all(isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b)), (a, b)


def test_a_node_that_cannot_reach_the_master_stops_in_bounded_time(make_cfg, tmp_path):
    path = write_config(make_cfg("alone"), tmp_path / "alone.yaml")
    start = time.time()
    (code, err), = finish([node(path, 1, free_port(), timeout_s=5)], limit=120)
    assert code != 0 and time.time() - start < 120
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: node 1 of 2: the nodes did not all meet (or lost the rendezvous) at 127.0.0.1:"), err[-2000:]
    assert "within 5 s" in last
    assert "Traceback" not in err


def test_nodes_with_different_configs_stop_with_one_line(make_cfg, tmp_path):
    a = write_config(make_cfg("mixed"), tmp_path / "a.yaml")
    b = write_config(make_cfg("mixed", **{"train.lr": 0.5}), tmp_path / "b.yaml")
    port = free_port()
    results = finish([node(a, 0, port), node(b, 1, port)])
    for code, err in results:
        assert code == 2, err[-3000:]
        assert "error: the processes of this run disagree: rank 1" in err and "train.lr: 0.5 vs 0.01" in err, err[-3000:]
        assert "Traceback" not in err
    assert not (tmp_path / "mixed").exists()  # stopped before anything was written
