"""One table row per algorithm: which TRL config/trainer runs it, its data rows, its config keys.

TRL (imported lazily) does the optimisation: DPOTrainer, RewardTrainer, GRPOTrainer, and for `ppo`
RLOOTrainer, because TRL 1.x ships no PPO trainer any more (`trl.experimental` has none either):
RLOO is PPO's clipped-ratio policy-gradient objective with the KL penalty to the reference, whose
baseline is the mean reward of the other completions of the same prompt instead of a learned value
head. glmtune supplies ids, rewards and adapters. The only TRL internals touched are the two places
TRL would tokenize text itself, so it trains exactly glmtune's template ids:

- DPO: `_prepare_dataset` returns glmtune's {prompt_ids, chosen_ids, rejected_ids} rows as they are
  (TRL's version would re-render them with the model folder's jinja template);
- GRPO/RLOO: `_tokenize_prompts` returns each prompt's glmtune ids, looked up by its rendered text.
RewardTrainer reads pre-tokenized {chosen_ids, rejected_ids} rows through its public path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from glmtune.align.config import AlignConfig
from glmtune.errors import ConfigError


def _dpo_trainer():
    from trl import DPOTrainer

    class GlmtuneDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Rows are glmtune's template ids already; only TRL's own drop of rows whose prompt fills
            # max_length is kept (keep_start truncation would leave no completion token).
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            return dataset
    return GlmtuneDPOTrainer


def _with_glmtune_prompts(base):
    class GlmtunePromptTrainer(base):
        glmtune_prompt_ids: dict[str, list[int]] = {}

        def _tokenize_prompts(self, prompts: list):
            # prompts are glmtune-rendered texts; their ids come from the template, never from
            # tokenizer(text), which would re-parse special-token strings and add its own prefix
            return [list(self.glmtune_prompt_ids[p]) for p in prompts], None, {}
    GlmtunePromptTrainer.__name__ = f"Glmtune{base.__name__}"
    return GlmtunePromptTrainer


def _grpo_trainer():
    from trl import GRPOTrainer
    return _with_glmtune_prompts(GRPOTrainer)


def _rloo_trainer():
    from trl import RLOOTrainer
    return _with_glmtune_prompts(RLOOTrainer)


def _reward_trainer():
    from trl import RewardTrainer
    return RewardTrainer


def _dpo_options(cfg: AlignConfig) -> dict:
    opts = {"beta": cfg.align.beta, "max_length": cfg.data.cutoff_len}
    if cfg.align.loss_type:
        opts["loss_type"] = [cfg.align.loss_type]
    return opts


def _rm_options(cfg: AlignConfig) -> dict:
    return {"max_length": cfg.data.cutoff_len}


def _rollout_options(cfg: AlignConfig) -> dict:
    """GRPO/RLOO: rollouts, clipping, KL; train.batch_size counts completions (prompts x num_generations)."""
    a, t = cfg.align, cfg.train
    if t.batch_size % a.num_generations:
        raise ConfigError(f"train.batch_size ({t.batch_size}) counts completions and must be a multiple of "
                          f"align.num_generations ({a.num_generations})", field="train.batch_size",
                          fix=f"set train.batch_size: {a.num_generations * max(1, t.batch_size // a.num_generations)}")
    eval_bs = cfg.eval.batch_size or t.batch_size
    if eval_bs % a.num_generations:
        raise ConfigError(f"eval.batch_size ({eval_bs}) must be a multiple of align.num_generations",
                          field="eval.batch_size")
    opts = {"num_generations": a.num_generations, "max_completion_length": a.max_new_tokens,
            "temperature": a.temperature, "beta": a.kl_coef, "epsilon": a.clip_range,
            "num_iterations": a.ppo_epochs, "reward_weights": [r.weight for r in a.rewards],
            "log_completions": False}
    return opts


def _grpo_options(cfg: AlignConfig) -> dict:
    opts = _rollout_options(cfg)
    if cfg.align.loss_type:
        opts["loss_type"] = cfg.align.loss_type
    return opts


@dataclass(frozen=True)
class Algorithm:
    name: str
    config_class: str                   # trl.<name>: the TrainingArguments subclass
    trainer: Callable[[], type]         # -> the (glmtune-adapted) TRL trainer class
    options: Callable[[AlignConfig], dict]
    rows: str                           # "pairs" (dpo), "rm_pairs" (rm) or "prompts" (grpo/ppo)
    sequence_classifier: bool = False   # rm: a scalar head on the model instead of the LM head


ALGORITHMS: dict[str, Algorithm] = {
    "dpo": Algorithm("dpo", "DPOConfig", _dpo_trainer, _dpo_options, "pairs"),
    "rm": Algorithm("rm", "RewardConfig", _reward_trainer, _rm_options, "rm_pairs", sequence_classifier=True),
    "grpo": Algorithm("grpo", "GRPOConfig", _grpo_trainer, _grpo_options, "prompts"),
    "ppo": Algorithm("ppo", "RLOOConfig", _rloo_trainer, _rollout_options, "prompts"),
}


def training_arguments(cfg: AlignConfig, algo: Algorithm, out_dir, *, has_dev: bool, cuda: bool):
    """The TRL config: glmtune's train/eval/output sections mapped onto TrainingArguments + the algorithm's keys."""
    import trl

    t, o = cfg.train, cfg.output
    kwargs = dict(
        output_dir=str(out_dir), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size or t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm or 0.0, num_train_epochs=t.epochs, max_steps=t.max_steps or -1, seed=t.seed,
        data_seed=t.seed, logging_steps=t.log_every,
        save_strategy="steps" if o.save_every else "no", save_steps=o.save_every or 500, save_total_limit=o.keep_last,
        eval_strategy="steps" if (cfg.eval.every and has_dev) else "no", eval_steps=cfg.eval.every or None,
        report_to="none",  # glmtune's Monitor writes metrics.jsonl, TensorBoard and the plots
        bf16=cfg.model.dtype == "bf16", fp16=cfg.model.dtype == "fp16",
        use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, dataset_num_proc=None,
    )
    kwargs.update(algo.options(cfg))
    config_cls = getattr(trl, algo.config_class)
    fields = set(config_cls.__dataclass_fields__)
    # transformers 5.24 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs);
    # the old names warn
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs.update({ckpt: t.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}})
    return config_cls(**{k: v for k, v in kwargs.items() if k in fields})
