"""The alignment config: `glmtune train`'s sections plus an `align:` section.

model/data/method/train/eval/output are the training config's shared sections (same keys, same docs,
same `--set` overrides) without the keys only `glmtune train` reads (data.packing, train_on,
truncate_side; prefix/freeze keys; output.profile_steps; speed:): naming one is an error that says
why, never a silent no-op. Each `align:` key lists the algorithms that read it (`algorithms` in its
field), and `check_for` refuses a key the chosen algorithm does not read. `model.adapter` names the
SFT adapter to start from. `glmtune align --explain` prints every key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from glmtune.errors import ConfigError
from glmtune.train.config import (ConfigSection, DataSourceSection, EvalSection, MethodCoreSection, ModelSection,
                                  RunOutputSection, TrainSection, check_model, config_error, read_raw_config)

ALGORITHMS = ("rm", "dpo", "kto", "orpo", "simpo", "grpo", "ppo")
PAIRWISE = ("dpo", "kto", "orpo", "simpo")      # preference-pair methods
ROLLOUT = ("grpo", "ppo")                       # RL on sampled completions

# `glmtune train` keys an align config may not carry, and why align has no use for them
TRAIN_ONLY = {
    "data.packing": "is a `glmtune train` key: align packs preference pairs itself (align.packing, dpo)",
    "data.train_on": "is a `glmtune train` key: preference and RL losses score the answers only",
    "data.truncate_side": "is a `glmtune train` key: align keeps a prompt's start and cuts the end of a row "
                          "longer than data.cutoff_len (TRL's keep_start)",
    "method.num_virtual_tokens": "is a prefix-tuning key: alignment runs lora, qlora or full",
    "method.prefix_projection": "is a prefix-tuning key: alignment runs lora, qlora or full",
    "method.trainable_layers": "is a freeze key: alignment runs lora, qlora or full",
    "output.profile_steps": "profiles `glmtune train`; TRL runs the alignment loop",
    "speed": "holds `glmtune train`'s speed levers; align's is align.packing (dpo)",
}


def _for(*algorithms: str) -> dict:
    return {"json_schema_extra": {"algorithms": list(algorithms)}}


class AlignModelSection(ModelSection):
    adapter: str | None = Field(None, description="SFT adapter folder to start from (e.g. runs/sft/final): it is "
                                                  "trained further, and a frozen copy of it is the reference model "
                                                  "(TRL's 'ref' adapter; no second copy of the base). Without it the "
                                                  "reference is model.path itself (the new adapter disabled).")


class AlignDataSection(DataSourceSection):
    on_overflow: Literal["truncate", "drop", "error"] = Field("truncate", description=(
        "A row longer than cutoff_len (prompt + the longer answer): truncate (kept; the trainer cuts its end, "
        "TRL's keep_start; a prompt that alone fills cutoff_len is dropped), drop it, or stop with an error."))


class AlignMethodSection(MethodCoreSection):
    pass


class RewardSpec(ConfigSection):
    name: str = Field(description="label, format, similarity, length, reward_model, judge, or module:function "
                                  "(called as TRL reward functions: fn(prompts, completions, **columns) -> floats).")
    weight: float = Field(1.0, description="Weight of this reward in the sum TRL optimises.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the reward (see "
                                                                       "glmtune.align.rewards).")


class AlignSection(ConfigSection):
    beta: float = Field(0.1, gt=0, description="dpo/kto: inverse temperature of the loss (0.1-0.5; higher stays "
                                               "closer to the reference); orpo: weight of the odds-ratio term "
                                               "(lambda, 0.1); simpo: reward scale (the paper uses 2.0-2.5).",
                        **_for("dpo", "kto", "orpo", "simpo"))
    loss_type: str | None = Field(None, description="TRL loss: dpo sigmoid (default), ipo, hinge, robust, "
                                                    "sigmoid_norm...; kto kto (default) or apo_zero_unpaired; "
                                                    "grpo dapo (default), grpo, dr_grpo, bnpo, cispo, sapo, luspo, "
                                                    "vespo, or gspo (TRL's GSPO recipe: the grpo loss with "
                                                    "sequence-level importance ratios; the paper clips them at "
                                                    "clip_range ~3e-4 and sets kl_coef 0).",
                                  **_for("dpo", "kto", "grpo"))
    importance_sampling: Literal["token", "sequence"] | None = Field(
        None, description="grpo: the probability ratio per token, or one per completion (the mean of its "
                          "tokens' log-ratios, GSPO); default token (sequence for gspo and luspo). TRL "
                          "importance_sampling_level.", **_for("grpo"))
    packing: Union[bool, Literal["auto"]] = Field(
        "auto", description="dpo: each batch's pairs as packed rows, the prompt once per pair ([prompt, chosen, "
                            "rejected], the rejected answer attending to the prompt and itself: align.pack_attention) "
                            "instead of two padded rows that repeat the prompt; logits only at answer "
                            "positions. Same loss and gradients as TRL's padded batch. auto: on for "
                            "transformers-native models with sdpa or eager attention.", **_for("dpo"))
    pack_attention: Literal["auto", "varlen", "mask"] = Field(
        "auto", description="dpo packing: how the rejected answer skips the chosen one. varlen: FlashAttention's "
                            "variable-length kernel with the prompt's keys shared by both answers, no mask (CUDA, "
                            "model.dtype bf16, sdpa); mask: SDPA/eager with a (rows, 1, T, T) block mask; auto: "
                            "varlen where it can run, else mask.", **_for("dpo"))
    pack_tokens: int | None = Field(None, gt=0, description="dpo packing with the block mask: most tokens in one "
                                                            "packed row (the mask is rows x tokens^2); default 4 x "
                                                            "data.cutoff_len.", **_for("dpo"))
    adapter_dtype: Literal["fp32", "model"] = Field(
        "fp32", description="dpo/kto/orpo/simpo/grpo/ppo with lora/qlora: adapter weights in fp32 (PEFT's "
                            "default: exact small updates; every adapted activation is copied to fp32 and back "
                            "under autocast) or in the model's dtype "
                            "(bf16: no such copies, but AdamW updates bf16 weights; train's fused LoRA layers "
                            "engage); `glmtune train`'s speed.adapter_dtype.",
        **_for("dpo", "kto", "orpo", "simpo", "grpo", "ppo"))
    precompute_reference: bool = Field(
        False, description="dpo: the reference log-probs of every training/dev pair computed once before "
                           "training (packed) instead of one extra no-grad forward per batch: faster from the "
                           "second epoch on, and full fine-tuning keeps no reference copy in memory.",
        **_for("dpo"))
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin (gamma/beta in the paper's "
                                                      "eq. 6; TRL simpo_gamma).", **_for("simpo"))
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (chosen) answers' "
                                                           "loss.", **_for("kto"))
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable (rejected) "
                                                             "answers' loss.", **_for("kto"))
    kl_coef: float = Field(0.05, ge=0, description="grpo/ppo: KL penalty to the reference (TRL `beta`); 0 loads "
                                                   "no reference at all.", **_for(*ROLLOUT))
    num_generations: int = Field(4, ge=2, description="grpo/ppo: completions sampled per prompt (the group whose "
                                                      "mean is the baseline); train.batch_size and "
                                                      "eval.batch_size then count completions and must "
                                                      "be multiples of it.", **_for(*ROLLOUT))
    max_new_tokens: int = Field(64, gt=0, description="grpo/ppo: longest sampled completion, in tokens.",
                                **_for(*ROLLOUT))
    temperature: float = Field(1.0, gt=0, description="grpo/ppo: sampling temperature of the rollouts.",
                               **_for(*ROLLOUT))
    clip_range: float = Field(0.2, gt=0, description="grpo/ppo: PPO clip range of the probability ratio (TRL "
                                                     "epsilon).", **_for(*ROLLOUT))
    ppo_epochs: int = Field(1, gt=0, description="grpo/ppo: optimisation passes over each batch of rollouts "
                                                 "(TRL num_iterations).", **_for(*ROLLOUT))
    rollouts: Literal["auto", "engine", "generate"] = Field(
        "auto", description="grpo/ppo: who samples the completions. engine: glmtune's generation engine on the "
                            "policy being trained (static KV cache, CUDA-graphed decode steps, the LoRA weights "
                            "read in place); generate: TRL's transformers generate; auto: the engine where it "
                            "can run the model, else generate (the reason printed once).", **_for(*ROLLOUT))
    rewards: list[RewardSpec] = Field(default_factory=list, description="grpo/ppo: the rewards, summed with their "
                                                                        "weights. Example: [{name: label}].",
                                      **_for(*ROLLOUT))


def algorithms_of(key: str) -> list[str]:
    """The algorithms that read align.KEY (from its field)."""
    return AlignSection.model_fields[key].json_schema_extra["algorithms"]


class AlignConfig(ConfigSection):
    model: AlignModelSection
    data: AlignDataSection
    method: AlignMethodSection = Field(default_factory=AlignMethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: RunOutputSection
    align: AlignSection = Field(default_factory=AlignSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "AlignConfig":
        if self.data.dev and self.data.val_size:
            raise ValueError("data.dev and data.val_size are mutually exclusive")
        if self.method.name not in ("lora", "qlora", "full"):
            raise ValueError(f"method.name={self.method.name} is not supported for alignment: use lora, qlora or full")
        if self.align.adapter_dtype == "model" and self.method.name == "full":
            raise ValueError("align.adapter_dtype=model applies to method lora/qlora only")
        if self.model.adapter and self.method.name == "full":
            raise ValueError("model.adapter with method.name=full: merge the adapter first (glmtune export) "
                             "and set model.path to the merged folder")
        return self


def reject_train_only(raw: dict, source: str | None) -> None:
    """A `glmtune train` key in an align config: one line naming it and why align does not read it."""
    for key, why in TRAIN_ONLY.items():
        node = raw
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            raise ConfigError(f"{key} {why}", file=source, field=key, fix="remove it from the align config")


def load_align_config(path: str | Path | dict, overrides: list[str] | None = None, *,
                      check_paths: bool = True) -> AlignConfig:
    """YAML (or a dict) + `KEY=VALUE` overrides -> a validated AlignConfig; errors name the key."""
    raw, source = read_raw_config(path, overrides)
    reject_train_only(raw, source)
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
    """The config as one algorithm reads it: every align key set must be one it reads; rewards for grpo/ppo."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}", fix=f"use one of {', '.join(ALGORITHMS)}")
    for key in sorted(cfg.align.model_fields_set):
        users = algorithms_of(key)
        if algorithm not in users:
            raise ConfigError(f"`glmtune align {algorithm}` does not use align.{key} (a key of "
                              f"{'/'.join(users)})", file=source, field=f"align.{key}",
                              fix="remove it from the config")
    if algorithm in ROLLOUT and not cfg.align.rewards:
        raise ConfigError(f"{algorithm} needs at least one reward", file=source, field="align.rewards",
                          fix="e.g. align.rewards: [{name: label}]")


def save_resolved(cfg: AlignConfig, out_dir: str | Path, algorithm: str) -> Path:
    """DIR/config.yaml with every default filled in, plus the algorithm it ran."""
    from glmtune.io import write_text_atomic
    path = Path(out_dir) / "config.yaml"
    write_text_atomic(path, yaml.safe_dump({"algorithm": algorithm, **cfg.model_dump(mode="json")},
                                           sort_keys=False, allow_unicode=True))
    return path
