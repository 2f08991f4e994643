"""`glmtune train` exit codes and one-line errors; a non-empty output.dir needs --resume or --overwrite."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from glmtune.cli.main import main
from glmtune.errors import ConfigError
from glmtune.train.checkpoint import prepare_output_dir


def _config_file(make_cfg, tmp_path, name="run", **over):
    cfg = make_cfg(name, **over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, path


def _exit(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_bad_override_and_accelerate_config_are_one_line_errors(make_cfg, tmp_path, capsys):
    _, path = _config_file(make_cfg, tmp_path)
    code, err = _exit(capsys, "train", path, "--set", "train.lr=[1")
    assert code == 2 and "train.lr" in err and "Traceback" not in err and len(err.splitlines()) <= 2
    code, err = _exit(capsys, "train", path, "--nproc", "2", "--accelerate-config", "nosuch")
    assert code == 2 and "no accelerate config 'nosuch'" in err
    code, err = _exit(capsys, "train", path, "--nproc", "2", "--accelerate-config", "deepspeed_zero2")
    assert code == 2 and "DeepSpeed, which is not installed" in err


def test_output_dir_that_is_a_file_is_refused(make_cfg, tmp_path, capsys):
    _, path = _config_file(make_cfg, tmp_path)
    (tmp_path / "run").write_text("not a folder")
    code, err = _exit(capsys, "train", path)
    assert code == 2 and "output.dir is a file" in err


def test_non_empty_output_dir_needs_resume_or_overwrite(make_cfg, tmp_path, capsys):
    cfg, path = _config_file(make_cfg, tmp_path)
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (out / "notes.txt").write_text("mine")
    code, err = _exit(capsys, "train", path)
    assert code == 2 and "is not empty" in err and "--overwrite" in err
    prepare_output_dir(cfg, resume="latest", overwrite=False)  # same config: fine
    changed = make_cfg("run", **{"train.lr": 0.5, "output.save_every": 7})
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.5") as e:
        prepare_output_dir(changed, resume="latest", overwrite=False)
    assert "save_every" not in str(e.value)  # how often to save is not what is learnt
    prepare_output_dir(cfg, resume=None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the run's files only


def test_nproc_2_exit_code_is_the_failure(make_cfg, tmp_path):
    _, path = _config_file(make_cfg, tmp_path, **{"data.datasets": [str(tmp_path / "missing.jsonl")]})
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "GLMTUNE_MASTER_PORT": "29563"}
    proc = subprocess.run([sys.executable, "-m", "glmtune", "train", str(path), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "missing.jsonl" in proc.stderr


def test_a_failed_run_leaves_no_output_dir_so_the_fixed_rerun_starts(make_cfg, tmp_path, capsys):
    """config.yaml was written before data and model were checked: the corrected rerun then found a
    non-empty output.dir ("not empty"; with --resume, "config differs")."""
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"messages": [\n', encoding="utf-8")
    good = make_cfg("run").model_dump(mode="json")
    failing = [({"datasets": [str(tmp_path / "missing.jsonl")]}, "missing.jsonl: field 'path': file not found"),
               ({"datasets": [str(malformed)]}, "bad.jsonl:1: invalid JSON"),
               ({"cutoff_len": 4}, "20 dropped because the tokens the cut never removes"),
               ({"datasets": []}, "field 'data.datasets': no training data")]
    for data, expected in failing:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({**good, "data": {**good["data"], **data}}))
        code, err = _exit(capsys, "train", path)
        assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
        assert expected in err.splitlines()[-1]
        assert not (tmp_path / "run").exists(), data
    path.write_text(yaml.safe_dump(good))
    main(["train", str(path)])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == good
