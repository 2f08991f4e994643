"""One table row per algorithm: which TRL config and trainer run it, its data rows, its options.

TRL (imported lazily) does the optimisation and the bookkeeping: DPOTrainer, KTOTrainer, ORPOTrainer,
CPOTrainer (SimPO = its `simpo` loss without the behaviour-cloning term), RewardTrainer, GRPOTrainer,
and for `ppo` RLOOTrainer, because TRL 1.x ships no PPO trainer any more: RLOO is PPO's
clipped-ratio policy-gradient objective with the KL penalty to the reference, whose baseline is the
mean reward of the other completions of the same prompt instead of a learned value head. glmtune
supplies ids, rewards and adapters. The TRL internals touched are the places TRL would tokenize text
itself, so it trains exactly glmtune's template ids:

- DPO / KTO: `_prepare_dataset` returns glmtune's pre-tokenized rows (TRL's would re-render them with
  the model folder's jinja template), keeping TRL's own filtering (and KTO's KL completions);
- ORPO / SimPO: `tokenize_row` turns a glmtune row into TRL's chosen_/rejected_/prompt_ columns;
- GRPO/RLOO: `_tokenize_prompts` returns each prompt's glmtune ids, looked up by its rendered text.
RewardTrainer reads pre-tokenized {chosen_ids, rejected_ids} rows through its public path; the packed
DPO trainer (glmtune.align.packed) replaces only DPO's forward passes.

Every option glmtune maps must be a field of the TRL config class: a missing one is an error naming
it (an unsupported TRL version), never silently dropped.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from glmtune.align.config import ALGORITHMS as ALGORITHM_NAMES
from glmtune.align.config import AlignConfig
from glmtune.errors import ConfigError, GlmtuneError


def _trl():
    import trl
    return trl


def _experimental(module: str):
    """trl.experimental.<module> (ORPO, CPO), without TRL's warning that experimental APIs may change:
    the pinned floor is tested (tests/align), and the message is not something a user can act on."""
    import importlib
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        return importlib.import_module(f"trl.experimental.{module}")


# --------------------------------------------------------------------------------------------------
# trainer classes (TRL's, adapted to glmtune's pre-tokenized rows)

def _dpo():
    from glmtune.align.packed import packed_dpo_trainer
    trl = _trl()
    return trl.DPOConfig, packed_dpo_trainer(_dpo_trainer(trl.DPOTrainer))


def _base_as_reference(base):
    """``base`` (a TRL trainer with a reference) taking ``fresh_adapter``: from a freshly initialised
    LoRA, TRL's frozen "ref" copy of the adapter is dropped and the reference is the base model."""
    class BaseReferenceTrainer(base):
        def __init__(self, *args, fresh_adapter: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            copied = "ref" in getattr(model, "peft_config", {})
            if fresh_adapter and getattr(self, "ref_model", None) is None and copied:
                # TRL copies a PeftModel's adapter into a frozen "ref" adapter and runs it in every
                # reference forward. A freshly initialised LoRA (B = 0) is the identity, so the reference
                # is the base model: the adapters off give the same log-probs without the LoRA work (in
                # the reference forward of every step, 2 GEMMs per adapted linear) nor its weights.
                model.delete_adapter("ref")
    BaseReferenceTrainer.__name__ = base.__name__
    return BaseReferenceTrainer


def _dpo_trainer(base):
    class GlmtuneDPOTrainer(_base_as_reference(base)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Rows are glmtune's template ids already; only TRL's own drop of rows whose prompt fills
            # max_length is kept (keep_start truncation would leave no completion token).
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            return dataset
    return GlmtuneDPOTrainer


def _kto():
    trl = _trl()

    class GlmtuneKTOTrainer(_base_as_reference(trl.KTOTrainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Rows are glmtune's {prompt_ids, completion_ids, label}; TRL's own steps after its
            # tokenization are kept: drop prompts that fill max_length, and the KL completions (each
            # batch's completions rotated by one, so every prompt is paired with another's answer).
            if args.max_length is not None:
                dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            if self.calculate_KL:
                def rotate(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch
                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset
    return trl.KTOConfig, GlmtuneKTOTrainer


def _pair_columns(self, feature, model=None) -> dict:
    """ORPO/CPO's tokenize_row for a glmtune row: prompt_/chosen_/rejected_ columns, labels -100 on the
    prompt, each side cut to max_length from the end (the prompt's start kept)."""
    p, out = feature["prompt_ids"], {"prompt_input_ids": feature["prompt_ids"],
                                     "prompt_attention_mask": [1] * len(feature["prompt_ids"])}
    for side in ("chosen", "rejected"):
        ids = (p + feature[f"{side}_ids"])[: self.max_length]
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, [1] * len(ids)
        out[f"{side}_labels"] = [-100] * min(len(p), len(ids)) + ids[len(p):]
    return out


def _orpo():
    orpo = _experimental("orpo")
    cls = type("GlmtuneORPOTrainer", (orpo.ORPOTrainer,), {"tokenize_row": _pair_columns})
    return orpo.ORPOConfig, cls


def _simpo():
    cpo = _experimental("cpo")
    cls = type("GlmtuneCPOTrainer", (cpo.CPOTrainer,), {"tokenize_row": _pair_columns})
    return cpo.CPOConfig, cls


def _with_glmtune_prompts(base, *, returns_logprobs: bool):
    class GlmtunePromptTrainer(_base_as_reference(base)):
        glmtune_prompt_ids: dict[str, list[int]] = {}
        glmtune_rollouts = None  # glmtune.align.rollout.EngineRollouts (set by run_alignment); None: TRL's generate

        def _tokenize_prompts(self, prompts: list):
            # prompts are glmtune-rendered texts; their ids come from the template, never from
            # tokenizer(text), which would re-parse special-token strings and add its own prefix
            return [list(self.glmtune_prompt_ids[p]) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
            # TRL's seam between prompts and completions (its vLLM / transformers branches): the
            # engine on the live policy when run_alignment chose it, else TRL's own; timed either way
            import time

            from glmtune.align.rollout import sampling_of

            mode = "train" if self.model.training else "eval"
            start = time.perf_counter()
            if self.glmtune_rollouts is None:
                out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            else:
                completions = self.glmtune_rollouts.generate(
                    self.accelerator.unwrap_model(self.model), prompt_ids, stop_ids=self.eos_token_ids,
                    sampling=sampling_of(self.generation_config))
                # GRPO also returns the sampler's log-probs (None: TRL computes them in its own forward)
                out = (completions, None) if returns_logprobs else completions
            self._metrics[mode]["rollout/seconds"].append(time.perf_counter() - start)
            return out
    GlmtunePromptTrainer.__name__ = f"Glmtune{base.__name__}"
    return GlmtunePromptTrainer


def _grpo():
    trl = _trl()
    return trl.GRPOConfig, _with_glmtune_prompts(trl.GRPOTrainer, returns_logprobs=True)


def _rloo():
    trl = _trl()
    return trl.RLOOConfig, _with_glmtune_prompts(trl.RLOOTrainer, returns_logprobs=False)


def _reward():
    trl = _trl()
    return trl.RewardConfig, trl.RewardTrainer


# --------------------------------------------------------------------------------------------------
# options: glmtune's align keys -> the TRL config's fields

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # GRPOConfig.loss_type
# glmtune's names for a (TRL loss_type, importance_sampling_level) pair: GSPO (Zheng et al. 2025) is
# the grpo loss on sequence-level ratios, as TRL's GSPO recipe sets it
GRPO_RECIPES = {"gspo": ("grpo", "sequence")}
SEQUENCE_LOSSES = ("luspo",)  # TRL: sequence-level ratios required


def _loss_type(cfg: AlignConfig, allowed: tuple[str, ...], algorithm: str) -> str | None:
    lt = cfg.align.loss_type
    if lt is not None and lt not in allowed:
        raise ConfigError(f"{algorithm} has no loss_type {lt!r}", field="align.loss_type",
                          fix=f"use one of {', '.join(allowed)}")
    return lt


def _dpo_options(cfg: AlignConfig) -> dict:
    opts = {"beta": cfg.align.beta, "max_length": cfg.data.cutoff_len,
            "precompute_ref_log_probs": cfg.align.precompute_reference}
    if lt := _loss_type(cfg, DPO_LOSSES, "dpo"):
        opts["loss_type"] = [lt]
    return opts


def _kto_options(cfg: AlignConfig) -> dict:
    a = cfg.align
    opts = {"beta": a.beta, "max_length": cfg.data.cutoff_len, "desirable_weight": a.desirable_weight,
            "undesirable_weight": a.undesirable_weight}
    if lt := _loss_type(cfg, KTO_LOSSES, "kto"):
        opts["loss_type"] = lt
    if opts.get("loss_type", "kto") == "kto" and cfg.train.batch_size < 2:
        raise ConfigError("kto estimates its KL term from the other answers of a batch: train.batch_size "
                          "must be at least 2", field="train.batch_size", fix="set train.batch_size: 2 or more")
    return opts


def _orpo_options(cfg: AlignConfig) -> dict:
    return {"beta": cfg.align.beta, "max_length": cfg.data.cutoff_len}


def _simpo_options(cfg: AlignConfig) -> dict:
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),
    # no reference model; TRL's CPOTrainer with loss_type simpo and no behaviour-cloning term (cpo_alpha 0)
    return {"beta": cfg.align.beta, "max_length": cfg.data.cutoff_len, "loss_type": "simpo",
            "simpo_gamma": cfg.align.simpo_gamma, "cpo_alpha": 0.0}


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
    return {"num_generations": a.num_generations, "max_completion_length": a.max_new_tokens,
            "temperature": a.temperature, "beta": a.kl_coef, "epsilon": a.clip_range,
            "num_iterations": a.ppo_epochs, "reward_weights": [r.weight for r in a.rewards],
            "log_completions": False}


def _grpo_options(cfg: AlignConfig) -> dict:
    opts = _rollout_options(cfg)
    lt = _loss_type(cfg, GRPO_LOSSES + tuple(GRPO_RECIPES), "grpo")
    level = cfg.align.importance_sampling
    if lt in GRPO_RECIPES:
        lt, wanted = GRPO_RECIPES[lt]
        if level not in (None, wanted):
            raise ConfigError(f"loss_type {cfg.align.loss_type} uses {wanted}-level importance ratios, not {level}",
                              field="align.importance_sampling", fix=f"drop it or set it to {wanted}")
        level = wanted
    if lt:
        opts["loss_type"] = lt
    if level is None and lt in SEQUENCE_LOSSES:
        level = "sequence"
    if level is not None:
        opts["importance_sampling_level"] = level
    return opts


@dataclass(frozen=True)
class Algorithm:
    name: str
    classes: Callable[[], tuple[type, type]]   # -> (TRL config class, glmtune-adapted TRL trainer class)
    options: Callable[[AlignConfig], dict]
    rows: str                   # "pairs" (dpo/orpo/simpo), "unpaired" (kto), "rm_pairs" (rm), "prompts" (grpo/ppo)
    sequence_classifier: bool = False   # rm: a scalar head on the model instead of the LM head
    reference: bool = True      # the loss compares with a frozen reference (orpo/simpo: none)
    packs: bool = False         # runs glmtune's packed pairs (align.packing)
    note: str | None = None     # printed when the run starts


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("rm", _reward, _rm_options, "rm_pairs", sequence_classifier=True, reference=False),
    Algorithm("dpo", _dpo, _dpo_options, "pairs", packs=True),
    Algorithm("kto", _kto, _kto_options, "unpaired"),
    Algorithm("orpo", _orpo, _orpo_options, "pairs", reference=False),
    Algorithm("simpo", _simpo, _simpo_options, "pairs", reference=False),
    Algorithm("grpo", _grpo, _grpo_options, "prompts"),
    Algorithm("ppo", _rloo, _rollout_options, "prompts",
              note="ppo: TRL 1.x has no PPO trainer; running RLOOTrainer (PPO-clipped objective, KL to the "
                   "reference, leave-one-out baseline instead of a value head)"),
)}
assert tuple(ALGORITHMS) == ALGORITHM_NAMES, "align.config.ALGORITHMS and this table must list the same algorithms"


def training_arguments(cfg: AlignConfig, algo: Algorithm, out_dir, *, has_dev: bool, cuda: bool):
    """The TRL config: glmtune's train/eval/output sections mapped onto TrainingArguments + the algorithm's keys."""
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
        use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True,
    )
    if algo.rows != "prompts":
        kwargs["dataset_num_proc"] = None  # TRL's dataset preparation in this process (no worker pool)
    kwargs.update(algo.options(cfg))
    config_cls, _ = algo.classes()
    fields = set(config_cls.__dataclass_fields__)
    # transformers 5.24 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs);
    # the old names warn. Decided by the field, not by the version.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs.update({ckpt: t.gradient_checkpointing, f"{ckpt}_kwargs": {"use_reentrant": False}})
    missing = sorted(k for k in kwargs if k not in fields)
    if missing:
        import trl
        raise GlmtuneError(f"TRL {trl.__version__}'s {config_cls.__name__} has no option {', '.join(missing)}, "
                           f"which `glmtune align {algo.name}` sets. Fix: install the TRL version pyproject.toml "
                           f"names (pip install -e \".[align]\")")
    return config_cls(**kwargs)
