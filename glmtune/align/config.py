"""The alignment config: `glmtune train`'s sections plus an `align:` section.

model/data/method/train/eval/output are the training config's own sections (same keys, same docs,
same `--set` overrides); `model.adapter` names the SFT adapter to start from. `glmtune align
--explain` prints every key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from glmtune.errors import ConfigError
from glmtune.train.config import (ConfigSection, DataSection, EvalSection, MethodSection, ModelSection, OutputSection,
                                  TrainSection, check_model, config_error, read_raw_config)

ALGORITHMS = ("rm", "dpo", "grpo", "ppo")


class AlignModelSection(ModelSection):
    adapter: str | None = Field(None, description="SFT adapter folder to start from (e.g. runs/sft/final): it is "
                                                  "trained further, and a frozen copy of it is the reference model "
                                                  "(TRL's 'ref' adapter; no second copy of the base). Without it the "
                                                  "reference is model.path itself (the new adapter disabled).")


class RewardSpec(ConfigSection):
    name: str = Field(description="label, format, similarity, length, reward_model, judge, or module:function "
                                  "(called as TRL reward functions: fn(prompts, completions, **columns) -> floats).")
    weight: float = Field(1.0, description="Weight of this reward in the sum TRL optimises.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the reward (see "
                                                                       "glmtune.align.rewards).")


class AlignSection(ConfigSection):
    beta: float = Field(0.1, gt=0, description="dpo: inverse temperature of the DPO loss (the starter kit uses "
                                               "0.1-0.5); higher stays closer to the reference.")
    loss_type: str | None = Field(None, description="TRL loss: dpo sigmoid (default), ipo, hinge, robust...; "
                                                    "grpo dapo (default), grpo, dr_grpo, bnpo.")
    kl_coef: float = Field(0.05, ge=0, description="grpo/ppo: KL penalty to the reference (TRL `beta`); 0 loads "
                                                   "no reference at all.")
    num_generations: int = Field(4, ge=2, description="grpo/ppo: completions sampled per prompt (the group whose "
                                                      "mean is the baseline); train.batch_size and "
                                                      "eval.batch_size then count completions and must "
                                                      "be multiples of it.")
    max_new_tokens: int = Field(64, gt=0, description="grpo/ppo: longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="grpo/ppo: sampling temperature of the rollouts.")
    clip_range: float = Field(0.2, gt=0, description="grpo/ppo: PPO clip range of the probability ratio (TRL epsilon).")
    ppo_epochs: int = Field(1, gt=0, description="grpo/ppo: optimisation passes over each batch of rollouts "
                                                 "(TRL num_iterations).")
    rewards: list[RewardSpec] = Field(default_factory=list, description="grpo/ppo: the rewards, summed with their "
                                                                        "weights. Example: [{name: label}].")


class AlignConfig(ConfigSection):
    model: AlignModelSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection
    align: AlignSection = Field(default_factory=AlignSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "AlignConfig":
        if self.data.dev and self.data.val_size:
            raise ValueError("data.dev and data.val_size are mutually exclusive")
        if self.method.name not in ("lora", "qlora", "full"):
            raise ValueError(f"method.name={self.method.name} is not supported for alignment: use lora, qlora or full")
        if self.output.profile_steps:
            raise ValueError("output.profile_steps profiles `glmtune train`; TRL runs the alignment loop: "
                             "remove it from an align config")
        if self.model.adapter and self.method.name == "full":
            raise ValueError("model.adapter with method.name=full: merge the adapter first (glmtune export) "
                             "and set model.path to the merged folder")
        return self


def load_align_config(path: str | Path | dict, overrides: list[str] | None = None, *,
                      check_paths: bool = True) -> AlignConfig:
    """YAML (or a dict) + `KEY=VALUE` overrides -> a validated AlignConfig; errors name the key."""
    raw, source = read_raw_config(path, overrides)
    try:
        cfg = AlignConfig.model_validate(raw)
    except ValidationError as e:
        err = config_error(e, source)
        if err.fix and "glmtune train --explain" in err.fix:
            err = ConfigError(err.problem, file=source, field=err.field,
                              fix="check the spelling; `glmtune align --explain` lists every key")
        raise err from None
    if check_paths:
        check_model(cfg, source)
        if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").exists():
            raise ConfigError(f"no adapter_config.json in {cfg.model.adapter}", file=source, field="model.adapter",
                              fix="point it at the folder `glmtune train` wrote (OUT/final)")
    return cfg


def check_for(cfg: AlignConfig, algorithm: str, source: str | None = None) -> None:
    """Keys one algorithm needs: rewards for grpo/ppo."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}", fix=f"use one of {', '.join(ALGORITHMS)}")
    if algorithm in ("grpo", "ppo") and not cfg.align.rewards:
        raise ConfigError(f"{algorithm} needs at least one reward", file=source, field="align.rewards",
                          fix="e.g. align.rewards: [{name: label}]")


def save_resolved(cfg: AlignConfig, out_dir: str | Path, algorithm: str) -> Path:
    """DIR/config.yaml with every default filled in, plus the algorithm it ran."""
    from glmtune.io import write_text_atomic
    path = Path(out_dir) / "config.yaml"
    write_text_atomic(path, yaml.safe_dump({"algorithm": algorithm, **cfg.model_dump(mode="json")},
                                           sort_keys=False, allow_unicode=True))
    return path
