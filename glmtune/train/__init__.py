"""Training: typed config, dataset encoding/packing, the accelerate loop, checkpoints, export.

Public API (used by `glmtune train`, `glmtune export` and `glmtune demo`):
    load_config(path, overrides) -> TrainConfig
    run_training(config, resume=None) -> TrainResult(output_dir, adapter_path, steps, final_loss, eval_loss, metrics)
    export_merged(base, adapter, out, shard_size="2GB") -> Path
"""
from __future__ import annotations


def __getattr__(name):  # lazy: `import glmtune.train` must not import torch
    if name in ("run_training", "TrainResult"):
        from glmtune.train import loop
        return getattr(loop, name)
    if name in ("load_config", "TrainConfig"):
        from glmtune.train import config
        return getattr(config, name)
    if name == "export_merged":
        from glmtune.train.export import export_merged
        return export_merged
    raise AttributeError(name)
