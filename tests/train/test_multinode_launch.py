"""The multi-node launch without starting processes: where the node values come from (flags, the
environment, SLURM under srun), the accelerate line they become (read back by accelerate's own
parser), the cross-node checks, the resume rule, the shipped examples and the --help text."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glmtune.errors import ConfigError
from glmtune.train.checkpoint import check_global_batch, prepare_output_dir
from glmtune.train.launch import (LAUNCH_ENV, Nodes, accelerate_command, check_flags_for_role, examples_digest,
                                  first_host, identity_mismatch, launch_role, prepares_output, resolve_nodes)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "multinode"


def test_first_host_of_a_slurm_nodelist():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node-a12") == "node-a12"
    assert first_host("a1,b[2-3]") == "a1"
    assert first_host("rack[3-4]-n[01-02],x") == "rack3-n01"


def test_nodes_from_flags_then_environment_then_srun():
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600", "NODE_RANK": "1", "NNODES": "2"}
    assert resolve_nodes(env=env) == Nodes(2, 1, "10.0.0.1", 29600, "environment")
    # a flag wins over the environment
    assert resolve_nodes(3, 2, "head", 1234, env=env) == Nodes(3, 2, "head", 1234, "flags")
    srun = {"SLURM_STEP_NUM_NODES": "4", "SLURM_NODEID": "3", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_NODELIST": "gpu[010-013]", "SLURM_JOB_NODELIST": "gpu[010-013]"}
    assert resolve_nodes(env=srun) == Nodes(4, 3, "gpu010", 29517, "SLURM")
    assert resolve_nodes(env={**srun, "MASTER_ADDR": "gpu012"}).master_addr == "gpu012"
    # an sbatch script or salloc shell is not on every node: SLURM_NNODES alone launches one node
    assert resolve_nodes(env={"SLURM_NNODES": "4", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[1-4]"}).nnodes == 1
    assert resolve_nodes(env={}) == Nodes(1, 0, "127.0.0.1", 29517, "flags")


@pytest.mark.parametrize("kw, env, message", [
    ({"nnodes": 2, "node_rank": 2}, {"MASTER_ADDR": "h"}, "--node-rank 2 is not one of the 2 nodes"),
    ({"nnodes": 2}, {}, "2 nodes need the address of node 0"),
    ({"nnodes": 0}, {}, "at least one node"),
    ({"nnodes": 2, "master_port": 70000}, {"MASTER_ADDR": "h"}, "not a TCP port"),
    ({}, {"NODE_RANK": "one"}, "NODE_RANK='one' is not a whole number"),
    ({}, {"SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "16", "MASTER_ADDR": "h"},
     "srun started 16 tasks on 2 nodes"),
])
def test_bad_node_values_are_one_line_errors(kw, env, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve_nodes(**kw, env=env)
    assert "\n" not in str(e.value)


def _parse(cmd):
    from accelerate.commands.launch import launch_command_parser
    return launch_command_parser().parse_args(cmd[3:])


def test_accelerate_line_for_node_one_of_two(tmp_path):
    cmd = accelerate_command(["train", "cfg.yaml", "--set", "train.lr=1e-4"], 8, None,
                             Nodes(2, 1, "10.0.0.1", 29600), timeout_s=120)
    args = _parse(cmd)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert (args.num_processes, args.num_machines, args.machine_rank) == (16, 2, 1)  # all nodes' processes
    assert (args.main_process_ip, args.main_process_port, args.same_network) == ("10.0.0.1", 29600, True)
    assert (args.rdzv_backend, args.rdzv_conf, args.max_restarts) == ("static", "timeout=120", 0)
    assert args.module and args.training_script == "glmtune.cli.main"
    assert args.training_script_args == ["train", "cfg.yaml", "--set", "train.lr=1e-4"]


def test_accelerate_config_for_other_machines_is_refused_and_deepspeed_gets_per_node_launch(tmp_path, monkeypatch):
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_machines": 2}))
    with pytest.raises(ConfigError, match="for 2 machines, glmtune runs on 3"):
        accelerate_command(["train", "c"], 8, str(two), Nodes(3, 0, "h"))
    assert _parse(accelerate_command(["train", "c"], 8, str(two), Nodes(2, 0, "h"))).num_machines == 2
    # DeepSpeed (not installed here: pretend it is): per-node launch unless the YAML names a launcher
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    cmd = accelerate_command(["train", "c"], 8, "deepspeed_zero2", Nodes(2, 1, "h"))
    assert _parse(cmd).deepspeed_multinode_launcher == "standard"
    hostfile_yaml = EXAMPLES / "deepspeed_zero3_hostfile.yaml"
    assert "--deepspeed_multinode_launcher" not in accelerate_command(["train", "c"], 8, str(hostfile_yaml), Nodes(2, 0, "h"))
    with pytest.raises(ConfigError, match="run glmtune on node 0 only"):
        accelerate_command(["train", "c"], 8, str(hostfile_yaml), Nodes(2, 1, "h"))


def test_roles_and_who_prepares_output_dir(monkeypatch):
    assert launch_role({}) == "launcher"
    assert launch_role({"LOCAL_RANK": "0", LAUNCH_ENV: "{}"}) == "child"
    assert launch_role({"LOCAL_RANK": "3"}) == "external"
    assert prepares_output("launcher", False, Nodes(2, 0, "h")) and not prepares_output("launcher", True, Nodes(2, 1, "h"))
    assert not prepares_output("child", False, None)
    monkeypatch.setenv("RANK", "5")
    assert prepares_output("external", False, None) and not prepares_output("external", True, None)
    with pytest.raises(ConfigError, match="--nproc, --nnodes given to a process that an external launcher started"):
        check_flags_for_role("external", nproc=8, nnodes=2, node_rank=None, master_addr=None, master_port=None)
    check_flags_for_role("launcher", nproc=8, nnodes=2, node_rank=None, master_addr=None, master_port=None)


def _ident(rank, **over):
    base = {"rank": rank, "world": 2, "host": f"h{rank}", "glmtune": "0.1.0", "examples": 20, "data": "abc",
            "launch": {"nnodes": 2, "nproc": 1, "node_rank": rank, "master_addr": "m", "master_port": 1},
            "config": {"train.lr": 0.01, "train.seed": 0}}
    return {**base, **over}


def test_identity_mismatch_names_what_differs():
    assert identity_mismatch([_ident(0), _ident(1)]) is None
    cfg = identity_mismatch([_ident(0), _ident(1, config={"train.lr": 0.5, "train.seed": 0})])
    assert cfg == "rank 1 (h1, node 1) has another config than rank 0 (h0, node 0) (train.lr: 0.5 vs 0.01)"
    flags = identity_mismatch([_ident(0), _ident(1, launch={**_ident(1)["launch"], "nproc": 2}, world=3)])
    assert "rank 1 (h1, node 1) was started with nproc=2, rank 0 (h0, node 0) with 1" == flags
    world = identity_mismatch([_ident(0, world=3), _ident(1, world=3)])
    assert "started for 2 node(s) x 1 process(es), but the run has 3 processes" in world
    assert "encoded other training data" in identity_mismatch([_ident(0), _ident(1, data="abd")])
    assert "runs glmtune 0.2" in identity_mismatch([_ident(0), _ident(1, glmtune="0.2")])


def test_examples_digest_sees_one_token():
    from glmtune.train.data import Example
    a = [Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])]
    b = [Example([1, 2, 3], [-100, 2, 3]), Example([5], [4])]
    assert examples_digest(a) == examples_digest(list(a)) != examples_digest(b)
    assert examples_digest(a) != examples_digest(a[::-1])  # the order is part of the run


def test_resume_on_other_process_counts_keeps_the_global_micro_batch(make_cfg, tmp_path):
    cfg = make_cfg("run", **{"train.batch_size": 2})
    out = tmp_path / "run"
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "micro_batches": 4, "processes": 4,
                                                         "global_micro_batch": 8}))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    check_global_batch(ckpt, 2, 4)
    check_global_batch(ckpt, 4, 2)
    with pytest.raises(ConfigError, match=r"written by 4 process\(es\) x train.batch_size 2 \(global micro-batch 8\); "
                                          r"this run has 2 x 2 = 4.*--set train.batch_size=4 on these 2 processes"):
        check_global_batch(ckpt, 2, 2)
    with pytest.raises(ConfigError, match="4 processes in all"):
        check_global_batch(ckpt, 2, 3)
    # the launcher's config check lets train.batch_size follow the process count, nothing else
    rescaled = make_cfg("run", **{"train.batch_size": 8})
    prepare_output_dir(rescaled, resume="latest", overwrite=False, processes=1)
    with pytest.raises(ConfigError, match="train.batch_size: 2 -> 8"):
        prepare_output_dir(rescaled, resume="latest", overwrite=False, processes=2)
    with pytest.raises(ConfigError, match="train.batch_size: 2 -> 8"):
        prepare_output_dir(rescaled, resume="latest", overwrite=False)


def test_help_shows_the_launch_flags():
    for argv in (["train", "--help"], ["align", "dpo", "--help"]):
        out = subprocess.run([sys.executable, "-m", "glmtune", *argv], capture_output=True, text=True, timeout=120,
                             env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}).stdout
        for flag in ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--dist-timeout",
                     "--accelerate-config"):
            assert flag in out, (argv, flag)


def test_shipped_examples_parse_and_use_real_flags():
    from accelerate.commands.config.config_args import load_config_from_file

    ds = load_config_from_file(str(EXAMPLES / "deepspeed_zero3_hostfile.yaml"))
    assert ds.num_machines == 2 and ds.deepspeed_config["deepspeed_multinode_launcher"] == "pdsh"
    hosts = [line.split() for line in (EXAMPLES / "hostfile").read_text().splitlines() if line and not line.startswith("#")]
    assert len(hosts) == ds.num_machines and all(h[1].startswith("slots=") for h in hosts)
    for script in ("slurm.sbatch", "torchrun.sh"):
        text = (EXAMPLES / script).read_text()
        assert subprocess.run(["bash", "-n", str(EXAMPLES / script)], timeout=30).returncode == 0
        assert "shared storage" in text and "Per node" in text
    sbatch = (EXAMPLES / "slurm.sbatch").read_text()
    assert "--ntasks-per-node=1" in sbatch and "glmtune train" in sbatch and "--nproc" in sbatch


def test_align_takes_the_same_launch_flags(make_cfg, tmp_path, monkeypatch):
    """`glmtune align dpo CFG --nproc 2 --nnodes 2 ...` checks the config, then launches `align dpo CFG`
    in every process (the launch itself is replaced here; `--nproc 2` DPO on gloo runs in the lead's check)."""
    import glmtune.train.launch as launch_mod
    from glmtune.cli.main import main

    cfg = tmp_path / "dpo.yaml"
    from glmtune.align.config import TRAIN_ONLY

    raw = make_cfg("dpo").model_dump(mode="json", include={"model", "data", "method", "train", "output"})
    for key in TRAIN_ONLY:  # train's sections, less what align refuses
        section, _, name = key.partition(".")
        raw.get(section, {}).pop(name, None)
    cfg.write_text(yaml.safe_dump(raw))
    seen = {}

    def fake_launch(cmd, *, nproc, nodes, timeout_s, console=None):
        seen.update(cmd=cmd, nproc=nproc, nodes=nodes, timeout_s=timeout_s)
        return 0

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    main(["align", "dpo", str(cfg), "--set", "align.beta=0.2", "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
          "--master-addr", "10.0.0.1", "--dist-timeout", "90"])
    args = _parse(seen["cmd"])
    assert args.training_script_args == ["align", "dpo", str(cfg), "--set", "align.beta=0.2"]
    assert (args.num_processes, args.machine_rank, args.main_process_ip, args.rdzv_conf) == (4, 1, "10.0.0.1", "timeout=90")
    with pytest.raises(SystemExit) as e:  # a bad key fails here, not in 4 processes
        main(["align", "dpo", str(cfg), "--set", "align.nosuch=1", "--nproc", "2"])
    assert e.value.code == 2


class _Process:
    """One process of a 2-process run, as check_shared_output sees it (the collectives are replaced)."""
    num_processes = 2

    def __init__(self, rank):
        self.process_index, self.is_main_process = rank, rank == 0

    def wait_for_everyone(self):
        pass


def test_output_dir_must_be_one_folder_for_all_nodes(tmp_path, monkeypatch):
    import accelerate.utils

    from glmtune.train.launch import check_shared_output

    def from_rank0(objs):
        objs[0] = "abc"  # the token rank 0 broadcast

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", from_rank0)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [(0, "h0", True), *mine])
    with pytest.raises(ConfigError, match=r"output.dir .* is not the same folder on every node: rank 1 \(.*\) did not "
                                          r"see the file rank 0 wrote there"):
        check_shared_output(_Process(1), tmp_path, wait_s=0.2)  # rank 0's probe never appears here
    (tmp_path / ".tmp-shared-abc").write_text("")
    check_shared_output(_Process(1), tmp_path, wait_s=0.2)  # it does: one folder
    (tmp_path / ".tmp-shared-abc").unlink()
    check_shared_output(_Process(0), tmp_path, wait_s=0.2)  # rank 0 writes the probe and removes it
    assert list(tmp_path.iterdir()) == []
