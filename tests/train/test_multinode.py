"""Two `glmtune train` launchers on 127.0.0.1 as two nodes x 1 process (gloo): the same losses as one
node x 2 processes and as one process over the same global batch; a killed node stops the other
within a bounded time, and `--resume latest` continues on one node; nodes that cannot meet or that
disagree stop with one line, never hang. Every subprocess has a timeout and talks only to 127.0.0.1."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from math import isclose

import psutil
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


def test_two_nodes_match_one_node_of_two_and_one_process(make_cfg, tmp_path):
    over = {"train.max_steps": 4, "train.lr": 1e-2}
    one = run_training(make_cfg("one", **over, **{"train.batch_size": 4}))  # one process, the global batch
    nodes_cfg = write_config(make_cfg("nodes", **over, **{"train.batch_size": 2}), tmp_path / "nodes.yaml")
    pair_cfg = write_config(make_cfg("pair", **over, **{"train.batch_size": 2}), tmp_path / "pair.yaml")
    port, port2 = free_port(), free_port()
    procs = [node(nodes_cfg, 0, port), node(nodes_cfg, 1, port),
             node(pair_cfg, 0, port2, "--nproc", 2, nnodes=1)]  # runs beside the two "nodes"
    for code, err in finish(procs):
        assert code == 0, err[-3000:]
    a = [m["loss"] for m in one.metrics if "loss" in m]
    b, c = losses(tmp_path / "nodes"), losses(tmp_path / "pair")
    assert len(a) == len(b) == len(c) == 4
    # fp32 losses near 12: 1e-6 relative is a few float32 ulps (one process sums the four conversations'
    # token losses in one reduction, two processes in two)
    assert all(isclose(x, y, rel_tol=1e-6) and isclose(x, z, rel_tol=1e-6) for x, y, z in zip(a, b, c)), (a, b, c)
    # written once: one final adapter, one metrics line per step
    assert (tmp_path / "nodes" / "final" / "adapter_model.safetensors").exists()
    assert [m["step"] for m in read_metrics(tmp_path / "nodes" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_killed_node_stops_the_other_and_resume_continues_on_one_node(make_cfg, tmp_path):
    over = {"train.max_steps": 10, "train.lr": 1e-2, "output.save_every": 2, "output.keep_last": 2}
    cfg2 = make_cfg("killed", **over, **{"train.batch_size": 2})
    path = write_config(cfg2, tmp_path / "killed.yaml")
    port, out = free_port(), tmp_path / "killed"
    log0 = open(tmp_path / "node0.log", "w+")
    n0, n1 = node(path, 0, port, log=log0), node(path, 1, port, timeout_s=60)
    deadline = time.time() + LIMIT_S
    while time.time() < deadline and n0.poll() is None and not list_checkpoints(out):
        time.sleep(0.05)
    assert n0.poll() is None and list_checkpoints(out), "the run ended (or never saved) before node 1 could be killed"
    kill_tree(n1)
    killed_at = time.time()
    finish([n1], limit=30)
    (code, _), = finish([n0], limit=90)  # gloo sees the peer's sockets close; NCCL would wait --dist-timeout
    log0.seek(0)
    err = log0.read()
    assert code != 0 and time.time() - killed_at < 90, err[-3000:]
    assert "error: rank 0: lost the other processes of the run" in err, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith("error: node 0: process rank 0 exited with status"), err[-2000:]
    assert not (out / "final").exists()
    done = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]

    # resume on one node, one process, the same global micro-batch (2 processes x 2 -> 1 x 4)
    cfg1 = make_cfg("killed", **over, **{"train.batch_size": 4})
    prepare_output_dir(cfg1, resume="latest", overwrite=False, processes=1)  # what `glmtune train --resume` checks
    resumed = run_training(cfg1, resume="latest")
    ref = run_training(make_cfg("ref", **over, **{"train.batch_size": 4}))
    steps = [m["step"] for m in resumed.metrics if "loss" in m]
    assert steps == list(range(1, 11)) and len(done) >= 2
    a, b = losses(tmp_path / "ref"), losses(out)
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
