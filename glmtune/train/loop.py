"""The training recipe, top to bottom: `run_training` = `setup` (config -> data -> model with its
speed levers -> optimizer -> resume) -> `train_loop` (steps; log, eval, checkpoint) -> `finish` (save).

A lean loop on accelerate (not TRL's SFTTrainer) because we need control of three things that a
Trainer hides: (1) the loss is the mean over the trained tokens of a whole optimizer step across
micro-batches and processes, so packed, unpacked and multi-process runs agree exactly; (2) the batch
layout (padding-free packing with position ids, later varlen/flash and fused linear-cross-entropy
kernels) is ours to change; (3) resume is exact because the data order is a pure function of the
step number, and accelerate restores optimizer, scheduler and RNG.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmtune.data.registry import load_dataset
from glmtune.templates import IGNORE_INDEX
from glmtune.train.checkpoint import (check_global_batch, list_checkpoints, load_checkpoint, register_state_hooks,
                                      resolve_resume, save_checkpoint)
from glmtune.train.config import TrainConfig, load_config, resolve_template, save_resolved
from glmtune.train.data import (BatchStream, collate, encode_records, split_dev, token_loss_sum,
                                total_steps, trained_tokens)
from glmtune.train.launch import check_one_run, check_shared_output, process_group_kwargs
from glmtune.train.monitor import Monitor, progress_bar, read_metrics
from glmtune.train.profile import StepProfiler
from glmtune.train.speed import AppliedSpeed, SpeedLevers, SpeedPlan, faster_settings, resolve_speed

from glmtune.train.model import DTYPES, apply_method, load_base, write_folder_extras  # noqa: F401 (DTYPES: public name)


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
    # kwargs_handlers: the collective timeout (--dist-timeout), so a lost node stops the run, not hangs it
    return Accelerator(mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.model.dtype],
                       cpu=not torch.cuda.is_available(), kwargs_handlers=process_group_kwargs())


def build_datasets(cfg: TrainConfig, tokenizer, template):
    records = [r for spec in cfg.data.datasets for r in load_dataset(spec, registry=cfg.data.registry)]
    if cfg.data.max_samples:
        records = records[: cfg.data.max_samples]
    if cfg.data.dev:
        dev_records = load_dataset(cfg.data.dev, registry=cfg.data.registry)
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
    model = load_base(cfg, device_index=accelerator.local_process_index)
    return apply_method(model, cfg, adapter_fp32=plan.adapter_fp32 if plan else True)


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
    from glmtune.models.peft_setup import count_params, memory_estimate_gib, method_traits

    total, trainable = count_params(model)
    mc = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    hidden = getattr(mc, "hidden_size", 0)
    layers = getattr(mc, "num_hidden_layers", getattr(mc, "num_layers", 0))
    method = method_traits(cfg.method.name)
    wbytes = 0.5 if method.quantized else (2 if cfg.model.dtype != "fp32" and not method.updates_base else 4)
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


def print_speed(console, applied: AppliedSpeed, hint: str | None) -> None:
    """The speed line (the levers that engaged), then why each other lever is off, then the hint."""
    from rich.markup import escape

    console.print(escape(applied.summary()))
    for note in applied.notes:
        console.print(f"[yellow]·[/] {escape(note)}")
    if hint:
        console.print(f"[cyan]·[/] {escape(hint)}")


# --------------------------------------------------------------------------------------------------
# the step

def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without waiting: a plain `.to("cuda")` of pageable memory synchronises the stream,
    so the host would idle until the GPU drained every kernel queued so far (once per batch). From
    pinned memory the copy is queued like a kernel and the host goes on issuing work."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _to(batch: dict, device, model_dtype) -> dict:
    out = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "attention_mask" in out and out["attention_mask"].ndim == 4:
        out["attention_mask"] = out["attention_mask"].to(model_dtype)
    return out


def global_count(accelerator, n_local: int):
    """The step's trained-token count over all processes: a float with one process (no device round
    trip), else a device tensor summed across processes (an all-reduce queued, not waited for)."""
    if accelerator.num_processes == 1:
        return float(n_local)
    n = to_device(torch.tensor(float(n_local), dtype=torch.float64), accelerator.device)
    return accelerator.reduce(n, "sum")


def at_least_one(n):
    """The loss denominator: a step without trained tokens divides by 1 (its loss sum is 0)."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1.0)


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
        return out.loss.float(), (labels[:, 1:] != IGNORE_INDEX).sum()
    logits = model(**inputs, use_cache=False).logits
    return token_loss_sum(logits, labels)


@dataclass
class StepResult:
    """One optimizer step's forward/backward, kept on the device: reading a value would make the host
    wait for the GPU every step, so the loop reads them once per logging window."""
    loss_sum: torch.Tensor      # summed token loss over this process's micro-batches (float64)
    n_global: object            # trained tokens over all processes: float (one process) or device tensor
    input_tokens: int           # non-pad tokens this process ran (host-side count)


def _eager_step(model, micro_batches, accelerator, plan: SpeedPlan, cfg: TrainConfig, *, pad_id: int,
                block_mask: bool, dtype, router=None) -> StepResult:
    """One optimizer step's forward/backward, micro-batch by micro-batch (collated, packed or padded).
    ``router`` (a MoE model's RouterBalance) is shown each padded batch's real tokens: padding is routed
    too, and its statistic leaves it out (packed rows have no padding)."""
    world = accelerator.num_processes
    batches = [collate(mb, packing=plan.packing, pad_id=pad_id, block_mask=block_mask, varlen=plan.varlen)
               for mb in micro_batches]
    n_global = global_count(accelerator, sum(trained_tokens(b) for b in batches))
    tokens = sum(int(b["input_ids"].numel() if plan.packing else b["attention_mask"].sum()) for b in batches)
    loss_total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for j, batch in enumerate(batches):
        batch = _to(batch, accelerator.device, dtype)
        if router is not None and not plan.packing:
            router.token_mask = batch["attention_mask"].reshape(-1).bool()
        sync = accelerator.no_sync(model) if j < len(batches) - 1 else contextlib.nullcontext()
        with sync, _saved_tensors_place(cfg.speed.offload_activations):
            s, _ = forward_loss_sum(model, batch, fused=plan.fused_loss)
            # DDP averages gradients over processes, so scale by world size
            accelerator.backward(s * world / at_least_one(n_global))
        loss_total += s.detach().double()
    return StepResult(loss_total, n_global, tokens)


def graphed_rows(graphed, micro_batches, pad_id: int):
    """The step's conversations packed best-fit into fixed rows, built on the host in one go:
    (ids, labels, positions, real-token flags) as one (4, rows, tokens) tensor, the rows' attention
    offsets, real tokens."""
    from glmtune.train.data import pack_rows_best_fit
    from glmtune.models.speed import padded_offsets
    from glmtune.train.graphs import fixed_row

    rows, offsets, tokens = [], [], 0
    for examples in micro_batches:
        for row in pack_rows_best_fit([len(e) for e in examples], graphed.tokens, lookahead=len(examples)):
            exs = [examples[i] for i in row]
            used = sum(len(e) for e in exs)
            ids, labels, pos = fixed_row([e.input_ids for e in exs], [e.labels for e in exs], graphed.tokens, pad_id)
            rows.append((ids, labels, pos, [1] * used + [0] * (graphed.tokens - used)))
            offsets.append(padded_offsets([len(e) for e in exs], graphed.tokens, graphed.max_segments))
            tokens += used
    rows_tensor = torch.tensor(rows, dtype=torch.long).transpose(0, 1)  # (4, rows, tokens)
    return rows_tensor, torch.tensor(offsets, dtype=torch.int32), tokens


def _graphed_step(graphed, micro_batches, accelerator, pad_id: int) -> StepResult:
    """One optimizer step's forward/backward through CUDA-graphed fixed rows.

    Each micro-batch's conversations are packed best-fit into rows of graphed.tokens tokens; the loss
    is the summed token loss over the step divided by the step's trained-token count (all processes),
    as the eager path. Every row goes to the device in one queued copy, so the host never waits.
    Several processes: the graphed blocks run outside DDP's forward (DDP's reducer never sees them), so
    the step all-reduces the gradients itself, once, in the decoder's flat buffers."""
    dev = accelerator.device
    n_local = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for mb in micro_batches for e in mb)
    n_global = global_count(accelerator, n_local)
    host_rows, host_offsets, tokens = graphed_rows(graphed, micro_batches, pad_id)
    ids, labels, pos, real = to_device(host_rows, dev)
    offsets = to_device(host_offsets, dev)
    loss_total = torch.zeros((), device=dev, dtype=torch.float64)
    for r in range(ids.shape[0]):
        s, _ = graphed.loss_sum(ids[r:r + 1], labels[r:r + 1], pos[r:r + 1], offsets=offsets[r], real=real[r] > 0)
        accelerator.backward(s / at_least_one(n_global))
        loss_total += s.detach().double()
    if accelerator.num_processes > 1:
        graphed.all_reduce_grads()
    return StepResult(loss_total, n_global, tokens)


def _saved_tensors_place(offload: bool):
    """Where autograd keeps what backward needs: on the device, or in (pinned) CPU memory."""
    if not offload:
        return contextlib.nullcontext()
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
# the recipe: setup -> train_loop -> finish (torchtune's recipe shape)

@dataclass
class Run:
    """Everything `setup` builds and `train_loop` / `finish` use."""
    cfg: TrainConfig
    accelerator: object
    console: object
    levers: SpeedLevers
    out: Path
    tokenizer: object
    template_name: str
    train_ex: list
    dev_ex: list
    stream: BatchStream
    dev_stream: BatchStream | None
    steps: int
    pad_id: int
    model: object = None
    optimizer: object = None
    scheduler: object = None
    monitor: Monitor | None = None
    graphed: object = None          # GraphedDecoder when speed.cuda_graphs engaged
    router: object = None           # RouterBalance on a mixture-of-experts model (router_aux_loss in metrics)
    model_dtype: object = None
    step: int = 0
    last_loss: float | None = None
    last_eval: float | None = None

    @property
    def plan(self) -> SpeedPlan:
        return self.levers.plan

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def eval_kwargs(self) -> dict:
        plan = self.plan
        return dict(packing=plan.packing, pad_id=self.pad_id, block_mask=plan.block_mask,
                    dtype=self.model_dtype, varlen=plan.varlen, fused=plan.fused_loss)

    def write_extras(self, folder: Path) -> None:
        """Tokenizer files and glmtune.json next to every checkpoint, so each folder is self-describing."""
        write_folder_extras(folder, self.tokenizer, self.cfg, self.template_name)

    def save(self, **kw) -> Path:
        world = self.accelerator.num_processes
        state = {"step": self.step, "micro_batches": self.step * self.cfg.train.grad_accum, "processes": world,
                 "global_micro_batch": self.cfg.train.batch_size * world}  # what a resume must keep (check_global_batch)
        return save_checkpoint(self.accelerator, self.model, self.out, self.step, self.write_extras, state, **kw)


def run_training(config: TrainConfig | str | Path | dict, *, resume: str | None = None,
                 overrides: list[str] | None = None, console=None, return_model: bool = False) -> TrainResult:
    """Train as the config says; return where the result is. `resume`: None, 'latest' or a checkpoint dir."""
    from rich.console import Console

    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    accelerator = make_accelerator(cfg)
    # every lever decided here, before anything heavy: a lever named but unavailable fails now
    plan = resolve_speed(cfg, processes=accelerator.num_processes, distributed=accelerator.distributed_type.value)
    console = console or Console(stderr=True, quiet=not accelerator.is_main_process)
    levers = SpeedLevers(plan, cfg)
    try:
        run = setup(cfg, accelerator, levers, console, resume=resume)
        train_loop(run)
        return finish(run, return_model=return_model)
    finally:
        levers.undo()  # the returned model: eager blocks, PEFT's forwards, its own attention; liger unpatched


def setup(cfg: TrainConfig, accelerator, levers: SpeedLevers, console, *, resume: str | None) -> Run:
    """Output folder, data, model (with the speed levers), optimizer and schedule, resume state."""
    from accelerate.utils import set_seed

    from glmtune.models.tokenizer import load_tokenizer

    out = Path(cfg.output.dir)
    set_seed(cfg.train.seed)

    # data
    tokenizer = load_tokenizer(cfg.model.path)
    template = resolve_template(cfg)
    train_ex, dev_ex, stats = build_datasets(cfg, tokenizer, template)
    check_one_run(accelerator, cfg, train_ex)  # same config, data and launch flags on every node, before the model loads
    world, rank = accelerator.num_processes, accelerator.process_index
    stream = BatchStream(len(train_ex), cfg.train.batch_size, seed=cfg.train.seed, rank=rank, world=world,
                         lengths=[len(e) for e in train_ex])
    dev_stream = (BatchStream(len(dev_ex), cfg.eval.batch_size or cfg.train.batch_size, seed=0, rank=rank,
                              world=world, shuffle=False) if dev_ex else None)
    steps = total_steps(stream.per_epoch, cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(cfg=cfg, accelerator=accelerator, console=console, levers=levers, out=out, tokenizer=tokenizer,
              template_name=template.name, train_ex=train_ex, dev_ex=dev_ex, stream=stream, dev_stream=dev_stream,
              steps=steps, pad_id=pad_id)

    # model: liger before it is built, the other levers on the loaded model
    levers.before_model()
    model = build_model(cfg, accelerator, levers.plan)
    if reads_packing_from_position_ids(model) != levers.plan.native:
        from glmtune.errors import GlmtuneError
        raise GlmtuneError(f"{cfg.model.path}: config.json's auto_map said the model "
                           f"{'runs' if levers.plan.native else 'does not run'} remote code, the loaded model disagrees")
    model = levers.on_model(model)
    run.router = router_balance(model)
    print_summary(console, cfg, model, stats, len(dev_ex), steps, world)

    # optimizer, schedule, accelerate, checkpoint state
    run.model, run.optimizer, run.scheduler = prepare_optimization(cfg, accelerator, model, steps)
    run.model_dtype = next(p.dtype for p in accelerator.unwrap_model(run.model).parameters() if p.is_floating_point())
    # train mode before any capture: a graph records what runs while it is captured, and transformers
    # checkpoints a block only in training mode (captured in eval mode, checkpointing never ran)
    run.model.train()
    run.graphed = graphed_decoder(run, accelerator.unwrap_model(run.model))
    # output.dir is created only now that data, tokenizer and model have loaded: a run that fails on its
    # inputs leaves no folder behind for the corrected rerun to refuse as "not empty"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out)
    check_shared_output(accelerator, out)  # several nodes: one output.dir for all of them
    # printed only now: a failed capture turns graphs and compile off, fused LoRA may have found no layer
    print_speed(console, levers.applied, faster_settings(cfg, levers.plan, cuda=accelerator.device.type == "cuda"))
    ckpt = resolve_resume(resume, out)
    if ckpt is not None:
        check_global_batch(ckpt, cfg.train.batch_size, world)  # any number of nodes, the same examples per step
        run.step = load_checkpoint(accelerator, run.model, ckpt)["step"]
        console.print(f"resumed from {ckpt} at step {run.step}")
    run.monitor = Monitor(out, enabled=run.main, resume_step=run.step, tensorboard=cfg.output.tensorboard,
                          plot=cfg.output.plot)
    return run


def graphed_decoder(run, model):
    """levers.graphed_decoder, with a MoE router's balance hooks reading the graphed rows' real-token
    mask (they must hold it before capture: the graph replays what they read then)."""
    mask = None
    if run.router is not None and run.levers.plan.graphs:
        mask = torch.ones(run.levers.plan.graph_tokens, dtype=torch.bool, device=run.accelerator.device)
        run.router.token_mask = mask
    graphed = run.levers.graphed_decoder(model, [len(e) for e in run.train_ex], token_mask=mask)
    if run.router is not None:
        run.router.reset()  # the capture's warm-up forwards ran the routers on placeholder rows
        if graphed is None:
            run.router.token_mask = None
    return graphed


def router_balance(model):
    """Hooks logging a mixture-of-experts model's router balance loss (None for a dense model)."""
    from glmtune.models.moe import RouterBalance, is_moe

    return RouterBalance(model) if is_moe(model) else None


def prepare_optimization(cfg: TrainConfig, accelerator, model, steps: int):
    """AdamW (fused on a single GPU or DDP), the schedule, accelerate.prepare; returns (model, optimizer, scheduler)."""
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    fused_adam = (accelerator.device.type == "cuda"
                  and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU))
    optimizer = make_optimizer(model, cfg, fused=fused_adam)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate reads DeepSpeed's micro-batch from a prepared dataloader; the loop has none
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, num_warmup_steps=math.ceil(cfg.train.warmup_ratio * steps),
                              num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process. It is stepped once
    # per optimizer step here, and registered so save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)
    register_state_hooks(accelerator)
    return model, optimizer, scheduler


def train_loop(run: Run) -> None:
    """Optimizer steps until run.steps: forward/backward, clip, step, then log / eval / checkpoint."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    ga = cfg.train.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    window = LogWindow()
    model.train()
    progress = progress_bar(run.main, run.steps, run.step)
    profiler = StepProfiler(run.out, cfg.output.profile_steps, enabled=run.main,
                            cuda=accelerator.device.type == "cuda")
    with progress:
        while run.step < run.steps:
            # 1-2. this step's micro-batches, forward/backward; the loss denominator is the step's
            # trained-token count over all micro-batches and processes
            micro = [[run.train_ex[i] for i in run.stream.indices(run.step * ga + j)] for j in range(ga)]
            if run.graphed is not None:
                result = _graphed_step(run.graphed, micro, accelerator, run.pad_id)
            else:
                result = _eager_step(model, micro, accelerator, run.plan, cfg, pad_id=run.pad_id,
                                     block_mask=run.plan.block_mask, dtype=run.model_dtype, router=run.router)
            # 3. clip, step, schedule
            grad_norm = (accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                         if cfg.train.max_grad_norm > 0 else None)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            profiler.step_done()
            window.add(accelerator.reduce(result.loss_sum, "sum") / at_least_one(result.n_global), result.input_tokens,
                       result.n_global)
            # 4. log, eval, checkpoint
            if run.step % cfg.train.log_every == 0 or run.step == run.steps:
                row = log_row(run, window, grad_norm)  # the one point where the host waits for the GPU
                run.last_loss = window.last_loss()
                run.monitor.log(row)
                progress.update(run.step, row)
                window = LogWindow()
            if run.dev_stream and cfg.eval.every and run.step % cfg.eval.every == 0 and run.step < run.steps:
                run.last_eval = evaluate(model, accelerator, run.dev_ex, run.dev_stream, **run.eval_kwargs())
                run.monitor.log({"step": run.step, "eval_loss": run.last_eval})
                run.monitor.refresh_plot()
            if cfg.output.save_every and run.step % cfg.output.save_every == 0 and run.step < run.steps:
                run.save(keep_last=cfg.output.keep_last)


@dataclass
class LogWindow:
    """What happened since the last metrics line: step losses, input tokens here, trained tokens (all
    processes). Losses and (several processes) token counts stay device tensors until read."""
    losses: list = field(default_factory=list)
    input_tokens: int = 0
    trained: list = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    def add(self, loss, input_tokens: int, trained_tokens) -> None:
        self.losses.append(loss)
        self.input_tokens += input_tokens
        self.trained.append(trained_tokens)

    def mean_loss(self) -> float:
        return sum(float(x) for x in self.losses) / len(self.losses)

    def last_loss(self) -> float:
        return float(self.losses[-1])

    @property
    def trained_tokens(self) -> int:
        return int(round(sum(float(x) for x in self.trained)))


def log_row(run: Run, window: LogWindow, grad_norm) -> dict:
    """One metrics.jsonl line. `loss` is the mean over the logging window's steps; input tokens are every
    non-pad token the model processed (all processes), trained tokens those that carry loss."""
    accelerator = run.accelerator
    dt = max(time.time() - window.t0, 1e-9)
    n_input = int(accelerator.reduce(torch.tensor(float(window.input_tokens), device=accelerator.device), "sum"))
    row = {"step": run.step, "epoch": round(run.stream.epoch_of(run.step * run.cfg.train.grad_accum), 4),
           "loss": window.mean_loss(), "lr": run.scheduler.get_last_lr()[0],
           "grad_norm": None if grad_norm is None else float(grad_norm),
           "trained_tokens": window.trained_tokens, "input_tokens": n_input,
           "trained_tokens_per_s": round(window.trained_tokens / dt, 1), "input_tokens_per_s": round(n_input / dt, 1)}
    if run.router is not None and (balance := run.router.read()) is not None:
        # DeepSeek-V3's balance loss (1.0 = even load over the experts), mean over MoE layers and the
        # window's training forwards on this process; logged, not trained (glmtune.models.moe)
        row["router_aux_loss"] = round(balance, 4)
    if accelerator.device.type == "cuda":  # this process's peak since the start
        row["peak_mem_allocated_gib"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
        row["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved(accelerator.device) / 2**30, 2)
    return row


def finish(run: Run, *, return_model: bool) -> TrainResult:
    """Final dev loss, the final adapter/model folder, close the logs; the trained model unwrapped."""
    accelerator = run.accelerator
    if run.dev_stream:
        run.last_eval = evaluate(run.model, accelerator, run.dev_ex, run.dev_stream, **run.eval_kwargs())
        run.monitor.log({"step": run.step, "eval_loss": run.last_eval})
    final = run.save(keep_last=None, with_state=False, name="final")
    if run.router is not None:
        run.router.remove()
    run.monitor.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained = accelerator.unwrap_model(run.model)
    return TrainResult(output_dir=run.out, adapter_path=final, steps=run.step, final_loss=run.last_loss,
                       eval_loss=run.last_eval, metrics=read_metrics(run.out / "metrics.jsonl") if run.main else [],
                       model=trained.eval() if return_model else None)


__all__ = ["TrainResult", "run_training", "list_checkpoints"]
