"""The training recipe, top to bottom: config -> data -> model -> optimizer -> loop -> save.

A lean loop on accelerate (not TRL's SFTTrainer) because we need control of three things that a
Trainer hides: (1) the loss is the mean over the trained tokens of a whole optimizer step across
micro-batches and processes, so packed, unpacked and multi-process runs agree exactly; (2) the batch
layout (padding-free packing with position ids, later varlen/flash and fused linear-cross-entropy
kernels) is ours to change; (3) resume is exact because the data order is a pure function of the
step number, and accelerate restores optimizer, scheduler and RNG.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmtune.train.checkpoint import (list_checkpoints, load_checkpoint, register_state_hooks, resolve_resume,
                                      save_checkpoint)
from glmtune.train.config import TrainConfig, load_config, resolve_template, save_resolved
from glmtune.train.data import (BatchStream, collate, encode_records, load_records, split_dev, token_loss_sum,
                                total_steps)
from glmtune.train.monitor import Monitor, progress_bar, read_metrics
from glmtune.train.speed import SpeedPlan, apply_liger, resolve_speed, set_attention

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path          # OUT/final: the adapter (lora/qlora/prefix) or the whole model (full/freeze)
    steps: int
    final_loss: float | None
    eval_loss: float | None
    metrics: list[dict] = field(default_factory=list)
    model: object = None        # the trained (unwrapped) model, only with run_training(..., return_model=True)


# --------------------------------------------------------------------------------------------------
# setup

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    # cpu=True without CUDA: under `accelerate launch` the processes then join a gloo group (MULTI_CPU)
    # instead of each running alone. Autocast in the config's dtype; for lora/prefix the frozen base is already stored in it and the
    # small trained tensors stay fp32, for full/freeze fp32 master weights are loaded (see build_model).
    return Accelerator(mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.model.dtype],
                       cpu=not torch.cuda.is_available())


def build_datasets(cfg: TrainConfig, tokenizer, template):
    records = [r for spec in cfg.data.datasets for r in load_records(spec, cfg.data.registry)]
    if cfg.data.max_samples:
        records = records[: cfg.data.max_samples]
    if cfg.data.dev:
        dev_records = load_records(cfg.data.dev, cfg.data.registry)
    else:
        records, dev_records = split_dev(records, cfg.data.val_size, cfg.train.seed)
    kw = dict(cutoff_len=cfg.data.cutoff_len, on_overflow=cfg.data.on_overflow, train_on=cfg.data.train_on,
              truncate_side=cfg.data.truncate_side)
    train, stats = encode_records(records, tokenizer, template, **kw)
    dev, _ = encode_records(dev_records, tokenizer, template, **kw) if dev_records else ([], {})
    return train, dev, stats


def build_model(cfg: TrainConfig, accelerator, plan: SpeedPlan | None = None):
    """Load the base in the right dtype, then apply the method (adapters, freezing, checkpointing).
    liger-kernel, when the plan uses it, must already be applied (it patches the classes built here)."""
    from glmtune.models.loading import load_model
    from glmtune.models.peft_setup import qlora_quant_config, setup_method

    method = cfg.method.name
    quant = qlora_quant_config() if method == "qlora" else None
    # full/freeze update the base weights: keep fp32 masters (AdamW on bf16 weights loses small updates)
    dtype = "float32" if method in ("full", "freeze") else DTYPES[cfg.model.dtype]
    if cfg.model.dtype == "fp16":
        dtype = "float32"  # fp16 training = fp32 weights + autocast + loss scaling (accelerate's scaler)
    model = load_model(cfg.model.path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
                       device_map={"": accelerator.local_process_index} if quant else None,
                       quantization_config=quant, trust_remote_code=cfg.model.trust_remote_code)
    model.config.use_cache = False  # a KV cache would also disable transformers' packed-sequence detection
    return setup_method(model, cfg.method, gradient_checkpointing=cfg.train.gradient_checkpointing,
                        adapter_fp32=plan.adapter_fp32 if plan else True)


def reads_packing_from_position_ids(model) -> bool:
    """transformers-native models build a block-diagonal mask (sdpa/eager/flex) or run varlen flash
    attention from restarting position ids; remote-code models need an explicit 4D mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.models.")


def make_optimizer(model, cfg: TrainConfig, *, fused: bool = False):
    """AdamW; no weight decay on biases and norm gains (1-D tensors), the usual GPT-2/LLaMA choice.
    `fused`: one CUDA kernel for all parameters (same update, far fewer launches)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8,
                             **({"fused": True} if fused else {}))


def print_summary(console, cfg, model, stats, n_dev, steps, world) -> None:
    from glmtune.models.peft_setup import count_params, memory_estimate_gib

    total, trainable = count_params(model)
    mc = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    hidden = getattr(mc, "hidden_size", 0)
    layers = getattr(mc, "num_hidden_layers", getattr(mc, "num_layers", 0))
    wbytes = 0.5 if cfg.method.name == "qlora" else (2 if cfg.model.dtype != "fp32" and cfg.method.name not in
                                                     ("full", "freeze") else 4)
    mem = memory_estimate_gib(total, trainable, weight_bytes=wbytes,
                              tokens_per_step=cfg.train.batch_size * cfg.data.cutoff_len, hidden=hidden,
                              layers=layers, vocab=getattr(mc, "vocab_size", getattr(mc, "padded_vocab_size", 0)),
                              checkpointing=cfg.train.gradient_checkpointing)
    console.print(f"[bold]{cfg.method.name}[/] on {cfg.model.path}: {total:,} parameters, {trainable:,} trainable "
                  f"({100 * trainable / max(total, 1):.3f}%)")
    console.print(f"data: {stats['encoded']} train conversations ({stats['truncated']} truncated, "
                  f"{stats['dropped']} dropped, {stats['no_loss']} without trained tokens), {n_dev} dev; "
                  f"{steps} optimizer steps x {cfg.train.batch_size} x {cfg.train.grad_accum} x {world} process(es)")
    console.print(f"memory estimate per process (GiB, worst case at cutoff_len): {mem}")


# --------------------------------------------------------------------------------------------------
# the step

def _to(batch: dict, device, model_dtype) -> dict:
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "attention_mask" in out and out["attention_mask"].ndim == 4:
        out["attention_mask"] = out["attention_mask"].to(model_dtype)
    return out


def forward_loss_sum(model, batch: dict, *, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch -> (sum of token losses, trained-token count).

    fused=False: logits, then token_loss_sum. fused=True: the model computes the loss itself from the
    labels (with liger-kernel patched in: fused linear + cross-entropy, the logits never exist);
    `num_items_in_batch=1` makes transformers' and liger's loss a sum (they divide the summed loss by
    it), which the loop divides by the whole optimizer step's trained-token count like the other path.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if fused:
        out = model(**inputs, labels=labels, num_items_in_batch=1, use_cache=False)
        return out.loss.float(), (labels[:, 1:] != -100).sum()
    logits = model(**inputs, use_cache=False).logits
    return token_loss_sum(logits, labels)


def _fit_plan_to_processes(plan: SpeedPlan, cfg: TrainConfig, accelerator, console) -> SpeedPlan:
    """Levers that depend on how accelerate runs the model: fused LoRA reads each layer's own weights
    (not FSDP's / DeepSpeed's sharded ones); CUDA graphs run one process."""
    from accelerate.utils import DistributedType

    from glmtune.errors import ConfigError

    if plan.fused_lora and accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        if cfg.speed.fused_lora is True:
            raise ConfigError(f"speed.fused_lora=true cannot run under {accelerator.distributed_type}",
                              field="speed.fused_lora", fix="set speed.fused_lora: auto")
        plan.fused_lora = False
        console.print(f"speed.fused_lora auto -> off ({accelerator.distributed_type})")
    if plan.graphs and accelerator.num_processes > 1:
        if cfg.speed.cuda_graphs is True:
            raise ConfigError("speed.cuda_graphs=true runs one process", field="speed.cuda_graphs",
                              fix="set speed.cuda_graphs: auto (off with several processes)")
        plan.graphs = False
        console.print("speed.cuda_graphs auto -> off (several processes)")
    return plan


def _graphed_decoder(plan: SpeedPlan, cfg: TrainConfig, model, train_ex, console):
    """Capture the decoder blocks as CUDA graphs for rows of plan.graph_tokens tokens; None (auto) if
    capture fails, with the reason printed."""
    from glmtune.errors import ConfigError
    from glmtune.models.graphs import GraphedDecoder

    shortest = max(1, min(len(e) for e in train_ex))
    max_segments = min(plan.graph_tokens // shortest + 1, 512)
    try:
        return GraphedDecoder(model, tokens=plan.graph_tokens, max_segments=max_segments, graph=True, varlen=True)
    except Exception as e:  # noqa: BLE001 - any capture failure: auto falls back to the eager step
        if cfg.speed.cuda_graphs is True:
            raise ConfigError(f"speed.cuda_graphs: capture failed ({type(e).__name__}: {e})",
                              field="speed.cuda_graphs", fix="set speed.cuda_graphs: auto or false") from e
        plan.graphs = False
        console.print(f"speed.cuda_graphs auto -> off (capture failed: {type(e).__name__}: {str(e)[:200]})")
        return None


def _eager_step(model, micro_batches, accelerator, plan: SpeedPlan, cfg: TrainConfig, *, pad_id: int,
                block_mask: bool, dtype):
    """One optimizer step's forward/backward, micro-batch by micro-batch (collated, packed or padded).
    Returns (summed loss, global trained-token count, tokens processed here)."""
    world = accelerator.num_processes
    batches = [collate(mb, packing=plan.packing, pad_id=pad_id, block_mask=block_mask, varlen=plan.varlen)
               for mb in micro_batches]
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    n_global = accelerator.reduce(torch.tensor(float(n_local), device=accelerator.device), "sum")
    loss_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = 0
    for j, batch in enumerate(batches):
        batch = _to(batch, accelerator.device, dtype)
        sync = accelerator.no_sync(model) if j < len(batches) - 1 else _nullcontext()
        with sync, _saved_tensors_place(cfg.speed.offload_activations):
            s, _ = forward_loss_sum(model, batch, fused=plan.fused_loss)
            # DDP averages gradients over processes, so scale by world size
            accelerator.backward(s * world / n_global.clamp(min=1))
        loss_total += s.detach().double()
        tokens += int(batch["input_ids"].numel() if plan.packing else batch["attention_mask"].sum())
    return loss_total, n_global, tokens


def _graphed_step(graphed, micro_batches, accelerator, pad_id: int):
    """One optimizer step's forward/backward through CUDA-graphed fixed rows (one process).

    Each micro-batch's conversations are packed best-fit into rows of graphed.tokens tokens; the loss
    is the summed token loss over the step divided by the step's trained-token count, as the eager
    path. Returns (summed loss, trained-token count, real tokens)."""
    from glmtune.models.graphs import fixed_row
    from glmtune.train.data import IGNORE, pack_rows_best_fit

    dev = accelerator.device
    n = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for mb in micro_batches for e in mb)
    n_global = torch.tensor(float(n), device=dev)
    loss_total = torch.zeros((), device=dev, dtype=torch.float64)
    tokens = 0
    for examples in micro_batches:
        for row in pack_rows_best_fit([len(e) for e in examples], graphed.tokens, lookahead=len(examples)):
            exs = [examples[i] for i in row]
            ids, labels, pos = (torch.tensor([x], device=dev) for x in
                                fixed_row([e.input_ids for e in exs], [e.labels for e in exs], graphed.tokens, pad_id))
            s, _ = graphed.loss_sum(ids, labels, pos, [len(e) for e in exs])
            accelerator.backward(s / n_global.clamp(min=1))
            loss_total += s.detach().double()
            tokens += sum(len(e) for e in exs)
    return loss_total, n_global, tokens


def _saved_tensors_place(offload: bool):
    """Where autograd keeps what backward needs: on the device, or in (pinned) CPU memory."""
    if not offload:
        return _nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, accelerator, examples, stream: BatchStream, *, packing, pad_id, block_mask, dtype,
             varlen: bool = False, fused: bool = False) -> float:
    """Mean loss over every trained token of the dev split (all processes together)."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for k in range(stream.per_epoch):
        idx = stream.indices(k)
        batch = _to(collate([examples[i] for i in idx], packing=packing, pad_id=pad_id, block_mask=block_mask,
                            varlen=varlen), accelerator.device, dtype)
        s, n = forward_loss_sum(model, batch, fused=fused)
        loss_sum += s.double()
        count += n.double()
    model.train()
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    return float(loss_sum / count.clamp(min=1))


# --------------------------------------------------------------------------------------------------
# the recipe

def run_training(config: TrainConfig | str | Path | dict, *, resume: str | None = None,
                 overrides: list[str] | None = None, console=None, return_model: bool = False) -> TrainResult:
    """Train as the config says; return where the result is. `resume`: None, 'latest' or a checkpoint dir."""
    from rich.console import Console

    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    plan = resolve_speed(cfg)  # before anything heavy: a lever named but unavailable fails here
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    console = console or Console(stderr=True, quiet=not main)
    for note in plan.notes:
        console.print(f"[yellow]·[/] {note}")
    undo_liger = apply_liger(plan, cfg)  # patches transformers' classes: before the model is built
    try:
        return _train(cfg, plan, accelerator, console, resume=resume, return_model=return_model)
    finally:
        if undo_liger is not None:
            undo_liger()


def _train(cfg: TrainConfig, plan: SpeedPlan, accelerator, console, *, resume, return_model) -> TrainResult:
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    from glmtune.models import speed as kernels
    from glmtune.models.tokenizer import load_tokenizer

    main = accelerator.is_main_process
    out = Path(cfg.output.dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
    set_seed(cfg.train.seed)

    # data
    tokenizer = load_tokenizer(cfg.model.path)
    template = resolve_template(cfg)
    template_name = template.name
    train_ex, dev_ex, stats = build_datasets(cfg, tokenizer, template)
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = BatchStream(len(train_ex), cfg.train.batch_size, seed=cfg.train.seed, rank=rank, world=world)
    dev_stream = (BatchStream(len(dev_ex), cfg.eval.batch_size or cfg.train.batch_size, seed=0, rank=rank,
                              world=world, shuffle=False) if dev_ex else None)
    ga = cfg.train.grad_accum
    steps = total_steps(stream.per_epoch, ga, cfg.train.epochs, cfg.train.max_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # model, optimizer, schedule
    model = build_model(cfg, accelerator, plan)
    native = reads_packing_from_position_ids(model)
    if native != plan.native:  # config.json's auto_map guessed wrong: decide again for what was loaded
        plan = resolve_speed(cfg, native=native)
    packing = plan.packing
    block_mask = packing and not native
    base_attn = set_attention(model, kernels.register_varlen_attention()) if plan.varlen else None
    plan = _fit_plan_to_processes(plan, cfg, accelerator, console)
    if plan.fused_lora:
        from glmtune.models.fused_lora import fuse_lora
        fuse_lora(model)  # before compile: compile traces the forward in place
    if plan.compile:
        try:
            kernels.compile_decoder_layers(model, dynamic=not plan.graphs)  # graphed rows have one shape
        except ValueError as e:
            from glmtune.errors import ConfigError
            raise ConfigError(f"speed.compile: {e}", field="speed.compile", fix="set speed.compile: false") from None
    console.print(plan.summary())
    print_summary(console, cfg, model, stats, len(dev_ex), steps, world)
    fused_adam = (accelerator.device.type == "cuda"
                  and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU))
    optimizer = make_optimizer(model, cfg, fused=fused_adam)
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * steps),
                              num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process. It is stepped once
    # per optimizer step here, and registered so save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)
    register_state_hooks(accelerator)
    model_dtype = next(p.dtype for p in accelerator.unwrap_model(model).parameters() if p.is_floating_point())
    # train mode before any capture: a graph records what runs while it is captured, and transformers
    # checkpoints a block only in training mode (captured in eval mode, checkpointing never ran)
    model.train()
    graphed = _graphed_decoder(plan, cfg, accelerator.unwrap_model(model), train_ex, console) if plan.graphs else None

    def write_extras(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        meta = {"template": template_name, "method": cfg.method.name, "base_model": str(Path(cfg.model.path).resolve())}
        (folder / "glmtune.json").write_text(json.dumps(meta, indent=2) + "\n")

    step = 0
    ckpt = resolve_resume(resume, out)
    if ckpt is not None:
        step = load_checkpoint(accelerator, model, ckpt)["step"]
        console.print(f"resumed from {ckpt} at step {step}")
    monitor = Monitor(out, enabled=main, resume_step=step, tensorboard=cfg.output.tensorboard, plot=cfg.output.plot)
    ev_kw = dict(packing=packing, pad_id=pad_id, block_mask=block_mask, dtype=model_dtype, varlen=plan.varlen,
                 fused=plan.fused_loss)
    params = [p for p in model.parameters() if p.requires_grad]

    progress, task = progress_bar(main, steps, step)
    last_loss = last_eval = None
    window_tokens, window_t0 = 0, time.time()
    with progress:
        while step < steps:
            # 1-2. this step's micro-batches, forward/backward; the loss denominator is the step's
            # trained-token count over all micro-batches and processes
            micro = [[train_ex[i] for i in stream.indices(step * ga + j)] for j in range(ga)]
            if graphed is not None:
                loss_total, n_global, tokens = _graphed_step(graphed, micro, accelerator, pad_id)
            else:
                loss_total, n_global, tokens = _eager_step(
                    model, micro, accelerator, plan, cfg, pad_id=pad_id, block_mask=block_mask, dtype=model_dtype)
            window_tokens += tokens
            # 3. clip, step, schedule
            grad_norm = (accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                         if cfg.train.max_grad_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = float(accelerator.reduce(loss_total, "sum") / n_global.double().clamp(min=1))

            # 4. log, eval, checkpoint
            lr = scheduler.get_last_lr()[0]
            if step % cfg.train.log_every == 0 or step == steps:
                dt = max(time.time() - window_t0, 1e-9)
                tps = window_tokens * world / dt
                monitor.log({"step": step, "epoch": round(stream.epoch_of(step * ga), 4), "loss": last_loss,
                             "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                             "trained_tokens": int(n_global), "tokens_per_s": round(tps, 1)})
                progress.update(task, completed=step, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                window_tokens, window_t0 = 0, time.time()
            if dev_stream and cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                last_eval = evaluate(model, accelerator, dev_ex, dev_stream, **ev_kw)
                monitor.log({"step": step, "eval_loss": last_eval})
                monitor.refresh_plot()
            if cfg.output.save_every and step % cfg.output.save_every == 0 and step < steps:
                save_checkpoint(accelerator, model, out, step, write_extras,
                                {"step": step, "micro_batches": step * ga}, cfg.output.keep_last)

    if dev_stream:
        last_eval = evaluate(model, accelerator, dev_ex, dev_stream, **ev_kw)
        monitor.log({"step": step, "eval_loss": last_eval})
    final = save_checkpoint(accelerator, model, out, step, write_extras, {"step": step, "micro_batches": step * ga},
                            keep_last=None, with_state=False, name="final")
    monitor.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained = accelerator.unwrap_model(model)
    # the returned model generates like any other: eager blocks, the model's own attention
    if plan.compile:
        kernels.uncompile_decoder_layers(trained)
    if plan.fused_lora:
        from glmtune.models.fused_lora import unfuse_lora
        unfuse_lora(trained)
    if base_attn is not None:
        set_attention(trained, base_attn)
    return TrainResult(output_dir=out, adapter_path=final, steps=step, final_loss=last_loss, eval_loss=last_eval,
                       metrics=read_metrics(out / "metrics.jsonl") if main else [],
                       model=trained.eval() if return_model else None)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["TrainResult", "run_training", "list_checkpoints"]
