"""Several processes: the `accelerate launch` line that `glmtune train --nproc N` runs.

The accelerate / DeepSpeed / FSDP presets ship inside the package (glmtune/resources/accelerate), so
`--accelerate-config ddp` works from a non-editable install as from a checkout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from glmtune.errors import ConfigError

ACCELERATE_DIR = Path(__file__).resolve().parents[1] / "resources" / "accelerate"
ACCELERATE_PRESETS = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")


def accelerate_config_path(name_or_path: str) -> Path:
    """A preset name (ddp, deepspeed_zero2, deepspeed_zero3, fsdp) -> its packaged YAML; else a path.

    Checked before N processes start (a missing file or an uninstalled DeepSpeed would otherwise fail
    in every process)."""
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
    return path


def accelerate_command(config: Path, sets: list[str], resume: str | None, nproc: int, accel: str | None) -> list[str]:
    """The `accelerate launch` line for --nproc N: one glmtune process per device (or per CPU slot).

    Without CUDA, accelerate's `--multi_gpu` launcher (torchrun) still starts N processes and they
    join a gloo process group, which is how multi-process runs are tested on CPU.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
           "--num_machines", "1", "--main_process_port", os.environ.get("GLMTUNE_MASTER_PORT", "29517")]
    if accel:
        cmd += ["--config_file", str(accelerate_config_path(accel))]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "glmtune.cli.main", "train", str(config)]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", resume]
    return cmd
