"""The alignment recipe, top to bottom: config -> data -> rewards -> model -> TRL trainer -> save.

The model goes through `glmtune train`'s seams (glmtune.train.model): the same weight dtype, base
load (qlora included), method from models.peft_setup.METHODS, and trained-folder extras (tokenizer,
glmtune.json). Everything that can fail on user input (config keys, data files, reward names) is checked before the
output folder is created, so a bad run writes nothing. The policy starts from `model.path` plus, if
given, the SFT adapter `model.adapter` (trained further; TRL keeps a frozen copy of it as the "ref"
adapter, so the reference is the starting policy without a second base model in memory).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.align.config import AlignConfig, check_for, load_align_config, save_resolved
from glmtune.align.data import PromptTable, preference_rows, prompt_table, reward_model_rows, unpaired_rows
from glmtune.align.trainers import ALGORITHMS, Algorithm, training_arguments
from glmtune.errors import ConfigError, InputError


@dataclass
class AlignResult:
    output_dir: Path
    adapter_path: Path                  # OUT/final
    steps: int
    metrics: list[dict] = field(default_factory=list)
    trainer: object = None              # the TRL trainer (for tests and notebooks)


# --------------------------------------------------------------------------------------------------
# data

def load_splits(cfg: AlignConfig) -> tuple[list[dict], list[dict]]:
    """Train and dev records, read as `glmtune train` reads them (a file in any format, or a name in
    data.registry); prompt-only records (grpo/ppo) need no assistant turn."""
    from glmtune.data.registry import load_dataset
    from glmtune.train.data import split_dev

    def read(spec: str) -> list[dict]:
        return load_dataset(spec, registry=cfg.data.registry, require_assistant=False)

    records = [r for spec in cfg.data.datasets for r in read(spec)]
    if cfg.data.max_samples:
        records = records[: cfg.data.max_samples]
    if cfg.data.dev:
        return records, read(cfg.data.dev)
    return split_dev(records, cfg.data.val_size, cfg.train.seed)


def build_rows(algo: Algorithm, records: list[dict], template, tokenizer, cfg: AlignConfig,
               table: PromptTable | None = None):
    """Rows for TRL (list of dicts) for one split; prompts also fill `table` (ids and conversations)."""
    kw = dict(cutoff_len=cfg.data.cutoff_len, on_overflow=cfg.data.on_overflow)
    if algo.rows == "pairs":
        return preference_rows(records, template, tokenizer, **kw)
    if algo.rows == "rm_pairs":
        return reward_model_rows(records, template, tokenizer, **kw)
    if algo.rows == "unpaired":
        return unpaired_rows(records, template, tokenizer, seed=cfg.train.seed, **kw)
    before = len(table.rows)
    prompt_table(records, template, tokenizer, table=table, **kw)
    return table.rows[before:]


def _dataset(rows: list[dict], what: str):
    from datasets import Dataset
    if not rows:
        raise InputError(f"no {what} rows left after encoding", field="data.datasets",
                         fix="check the data format for this algorithm (glmtune align --explain)")
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------
# model

def load_policy(cfg: AlignConfig, algo: Algorithm, template, tokenizer):
    """The model TRL trains: LM (+ SFT adapter, or the method's fresh adapter) or, for rm, a scalar-head
    classifier; loaded and set up by train's functions (glmtune.train.model)."""
    from transformers import set_seed

    from glmtune.models.peft_setup import enable_checkpointing
    from glmtune.train.model import apply_method, load_base

    set_seed(cfg.train.seed)  # a fresh LoRA's init depends on it, not on what ran before in the process
    model = load_base(cfg, device_index=int(os.environ.get("LOCAL_RANK", "0")),
                      sequence_classifier=algo.sequence_classifier)
    if algo.sequence_classifier:
        model.config.pad_token_id = tokenizer.pad_token_id
        return apply_method(model, cfg, task_type="SEQ_CLS")
    # rollouts stop where serving stops: the template's end tokens, not only the folder's eos
    model.generation_config.eos_token_id = template.stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    adapter_fp32 = cfg.align.adapter_dtype == "fp32"
    if cfg.model.adapter:
        from peft import PeftModel
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(model, {"use_reentrant": False})
            model.enable_input_require_grads()
        return PeftModel.from_pretrained(model, cfg.model.adapter, is_trainable=True,
                                         autocast_adapter_dtype=adapter_fp32)
    return apply_method(model, cfg, adapter_fp32=adapter_fp32)


# --------------------------------------------------------------------------------------------------
# the run

def run_alignment(algorithm: str, config, *, overrides: list[str] | None = None, resume: str | None = None,
                  console=None) -> AlignResult:
    """`glmtune align ALGORITHM CONFIG`: train, write OUT/{final, metrics.jsonl, loss.png, reward.png, config.yaml}."""
    import torch
    from rich.console import Console

    from glmtune.align.monitor import close_monitor, monitor_callback
    from glmtune.align.rewards import RewardContext, build_rewards
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.train.checkpoint import resolve_resume
    from glmtune.train.config import resolve_template
    from glmtune.train.monitor import Monitor, read_metrics

    console = console or Console(stderr=True)
    cfg = config if isinstance(config, AlignConfig) else load_align_config(config, overrides)
    source = None if isinstance(config, (AlignConfig, dict)) else str(config)
    check_for(cfg, algorithm, source)
    algo = ALGORITHMS[algorithm]
    if algo.sequence_classifier and cfg.model.adapter:
        raise ConfigError("a reward model starts from a model folder, not an adapter", file=source,
                          field="model.adapter", fix="merge the SFT adapter first (glmtune export) or drop model.adapter")

    # -- everything user-supplied is checked here, before anything is written -------------------------
    tokenizer = load_tokenizer(cfg.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = resolve_template(cfg)
    train_records, dev_records = load_splits(cfg)
    table = PromptTable([]) if algo.rows == "prompts" else None
    train_ds = _dataset(build_rows(algo, train_records, template, tokenizer, cfg, table), "training")
    dev_ds = _dataset(build_rows(algo, dev_records, template, tokenizer, cfg, table), "dev") if dev_records else None
    trainer_kw = {}
    if algo.rows == "prompts":
        ctx = RewardContext(train_records, template, tokenizer, table.messages)
        fns, _ = build_rewards(cfg.align.rewards, ctx)
        trainer_kw = {"reward_funcs": fns}

    out = Path(cfg.output.dir)
    ckpt = resolve_resume(resume, out)
    args = training_arguments(cfg, algo, out, has_dev=dev_ds is not None, cuda=torch.cuda.is_available())
    model = load_policy(cfg, algo, template, tokenizer)
    rollouts, rollout_note = None, None
    if algo.rows == "prompts":  # decided (align.rollouts: engine on a model it cannot run fails) before writing
        from glmtune.align.rollout import plan_rollouts
        rollouts, rollout_note = plan_rollouts(cfg.align.rollouts, model, args, map(len, table.ids.values()),
                                               algorithm, say=console.print,
                                               local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    pack_note = None
    if algo.packs:  # decided (align.packing: true on a model that cannot pack fails) before anything is written
        from glmtune.align.packed import decide_packing
        trainer_kw["packing"], pack_note = decide_packing(cfg, model)
    if algo.reference and not algo.sequence_classifier:
        trainer_kw["fresh_adapter"] = cfg.model.adapter is None  # the reference is then the base model

    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out, algorithm)
    main = int(os.environ.get("RANK", "0")) == 0
    # -1 on a fresh run: drop every old row, including a previous run's step-0 evaluation
    resume_step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"] if ckpt else -1
    monitor = Monitor(out, enabled=main, resume_step=resume_step, tensorboard=cfg.output.tensorboard,
                      plot=cfg.output.plot)
    _, trainer_cls = algo.classes()
    if algo.rows == "prompts":
        trainer_cls.glmtune_prompt_ids = table.ids
    if pack_note:
        console.print(pack_note)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                          processing_class=tokenizer, callbacks=[monitor_callback(monitor)], **trainer_kw)
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl/TensorBoard, not dicts on stdout
    trainer.glmtune_rollouts = rollouts
    fused_note = fuse_policy_lora(trainer, cfg)
    for note in (algo.note, rollout_note, fused_note):
        if note:
            console.print(note)
    console.print(f"[bold]{algorithm}[/] ({type(trainer).__name__}) on {cfg.model.path}"
                  + (f" + {cfg.model.adapter}" if cfg.model.adapter else "")
                  + f": {len(train_ds)} training rows, {len(dev_ds) if dev_ds is not None else 0} dev rows")

    if dev_ds is not None and ckpt is None:
        trainer.evaluate()  # step 0: the starting policy's held-out metrics, for before/after
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if dev_ds is not None:
        trainer.evaluate()
        if algo.rows == "pairs" and algo.reference and main:
            from glmtune.align.metrics import preference_kl
            monitor.log({"step": trainer.state.global_step, "eval_kl": preference_kl(trainer, dev_ds)})
    if rollouts is not None:  # the rollout engine's KV cache and graphs (after an error: at exit, infer.engine)
        rollouts.close()
    final = save_final(trainer, tokenizer, cfg, algorithm, template.name, out / "final")
    close_monitor(monitor, cfg.output.plot)
    return AlignResult(out, final, trainer.state.global_step,
                       metrics=read_metrics(out / "metrics.jsonl") if main else [], trainer=trainer)


def fuse_policy_lora(trainer, cfg: AlignConfig) -> str | None:
    """Train's fused LoRA (glmtune.models.fused_lora) on the policy's LoRA layers where it engages
    (exact: a layer that cannot take it on a call runs PEFT's forward); the line saying so, or why not.
    TRL's reference forwards run with the adapters off (or TRL's "ref" adapter), which the fused
    layers leave to PEFT."""
    from glmtune.models.fused_lora import fuse_lora
    from glmtune.train.speed import fused_lora_blockers

    if cfg.method.name not in ("lora", "qlora"):
        return None
    why = fused_lora_blockers(cfg.model.dtype, cfg.align.adapter_dtype, cfg.method.dropout,
                              trainer.accelerator.distributed_type.value, key="align.adapter_dtype")
    if why:
        return f"fused LoRA: off ({'; '.join(why)})"
    counts = fuse_lora(trainer.accelerator.unwrap_model(trainer.model))
    return (f"fused LoRA: {counts['fused']} of {counts['linear']} LoRA linears"
            + (f" and {counts['mlp']} gated MLPs" if counts["mlp"] else ""))


def save_final(trainer, tokenizer, cfg: AlignConfig, algorithm: str, template_name: str, folder: Path) -> Path:
    """OUT/final: the trained adapter (only the policy's, not TRL's frozen "ref" copy) or the whole model,
    with the tokenizer files and glmtune.json `glmtune train` writes (train.model.write_folder_extras), so
    Predictor/chat/serve/export read it like a training output."""
    from glmtune.train.model import write_folder_extras
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, selected_adapters=["default"])
    else:
        trainer.save_model(str(folder))
    write_folder_extras(folder, tokenizer, cfg, template_name, algorithm=algorithm)
    return folder
