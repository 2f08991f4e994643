"""The config's `speed` section (and data.packing: auto) resolved against this machine and model,
and applied / undone in one place.

`resolve_speed` decides every lever once, before anything heavy loads, with one small decider per
lever (packing, attention, compile, liger, fused LoRA, CUDA graphs), each returning its value and the
note of its fallback. They are pure given what they are told about the machine (CUDA, varlen kernel,
liger-kernel, accelerate's processes), so every branch is testable on a CPU: `auto` levers that
cannot run fall back with a note; levers named explicitly that cannot run are a ConfigError naming
the key and the fix. The resulting SpeedPlan is frozen: it says what was decided, never what ran.
`SpeedLevers` applies the plan (liger before the model is built, attention / fused LoRA / compile on
the loaded model, CUDA graphs after accelerate.prepare) and records what really engaged in an
`AppliedSpeed` (a failed capture turns graphs and compile off; fused LoRA may find no layer it can
fuse); run_training prints the speed line and the fallback notes from that, after capture, and
`undo()` restores it all. The kernels themselves live in glmtune.models.speed and glmtune.models.fused_lora.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from glmtune.errors import ConfigError, GlmtuneError
from glmtune.models.folder import read_model_folder
from glmtune.models.peft_setup import MethodTraits, method_traits
from glmtune.train.config import TrainConfig

GPU_EXTRA = 'pip install -e ".[gpu]"'
# Sharded weights (FSDP, DeepSpeed) are gathered by hooks around each module's forward: compiled
# blocks, liger's fused loss (it reads the LM head's weight outside the head's forward) and fused LoRA
# (it reads each layer's own weights) are not what those hooks expect (on 2xH200, FSDP2 + liger:
# "aten.mm.out got mixed torch.Tensor and DTensor"), so auto leaves them off there.
SHARDED = ("FSDP", "DEEPSPEED")


@dataclass(frozen=True)
class SpeedPlan:
    """What resolve_speed decided, before anything is applied. Frozen: what engaged is SpeedLevers.applied."""
    packing: bool
    varlen: bool = False          # attention = glmtune_varlen (FlashAttention varlen) on packed rows
    liger: str = "none"           # none | flce | all
    compile: bool = False         # regional torch.compile of the decoder blocks
    adapter_fp32: bool = True     # PEFT autocast_adapter_dtype
    native: bool = True           # transformers-native modelling code (reads packing from position ids)
    fused_lora: bool = False      # glmtune.models.fused_lora
    graphs: bool = False          # CUDA-graphed decoder blocks over fixed rows (glmtune.train.graphs)
    graph_tokens: int = 0         # tokens per graphed row
    expert_lora: bool = False     # MoE: routed experts' LoRA through grouped GEMMs (glmtune.models.expert_lora)
    fused_norm: bool = False      # RMSNorms keeping their input, not an fp32 copy (glmtune.models.rms_norm)
    notes: tuple[str, ...] = ()   # why each `auto` lever that is off fell back

    @property
    def fused_loss(self) -> bool:
        """liger's fused linear + cross-entropy computes the loss inside the model's forward."""
        return self.liger != "none"

    @property
    def block_mask(self) -> bool:
        """Packed rows carry an explicit block-diagonal 4D mask: remote-code models do not read packing
        from position ids."""
        return self.packing and not self.native


@dataclass(frozen=True)
class AppliedSpeed:
    """What SpeedLevers really engaged, lever by lever (a lever starts off and is set when it is
    applied). The speed line and the `·` notes are printed from this, after CUDA-graph capture."""
    packing: bool
    adapter_fp32: bool = True
    varlen: bool = False
    liger: str = "none"
    compile: bool = False
    fused_layers: tuple[int, int] | None = None  # (LoRA layers running fused, LoRA layers); None = not fused
    graphs: bool = False
    graph_tokens: int = 0
    expert_blocks: int = 0        # MoE expert blocks running the grouped expert LoRA
    fused_norms: int = 0          # RMSNorm modules running glmtune.models.rms_norm
    notes: tuple[str, ...] = ()   # the plan's fallbacks, then those found while applying

    @property
    def fused_lora(self) -> bool:
        return self.fused_layers is not None

    def noting(self, note: str, **changes) -> AppliedSpeed:
        return replace(self, notes=self.notes + (note,), **changes)

    def summary(self) -> str:
        """The levers that engaged, nothing else (what was turned off is in the notes)."""
        on = [f"packed rows ({'varlen FlashAttention' if self.varlen else 'model attention'})" if self.packing
              else "padded batches"]
        if self.liger != "none":
            on.append(f"liger {self.liger}")
        if self.compile:
            on.append("compiled blocks")
        if not self.adapter_fp32:
            on.append("adapters in the model dtype")
        if self.fused_layers is not None:
            on.append(f"fused LoRA ({self.fused_layers[0]} of {self.fused_layers[1]} LoRA layers)")
        if self.graphs:
            on.append(f"CUDA graphs ({self.graph_tokens}-token rows)")
        if self.expert_blocks:
            on.append(f"grouped expert LoRA ({self.expert_blocks} MoE layers)")
        if self.fused_norms:
            on.append(f"fused RMSNorm ({self.fused_norms} norms)")
        return "speed: " + ", ".join(on)


def is_native(cfg: TrainConfig) -> bool:
    """Whether transformers' own modelling code will load this folder (not the folder's remote code)."""
    return not (cfg.model.trust_remote_code and read_model_folder(cfg.model.path).remote_code)


# --------------------------------------------------------------------------------------------------
# one decider per lever: (value, the note of an `auto` fallback or None); ConfigError for a lever
# named explicitly that cannot run

def decide_packing(cfg: TrainConfig, traits: MethodTraits, *, native: bool) -> tuple[bool, str | None]:
    """data.packing auto = on wherever transformers reads packing from position ids."""
    if cfg.data.packing != "auto":
        return bool(cfg.data.packing), None
    if traits.packs and native:
        return True, None
    return False, f"data.packing auto -> off ({'remote-code model' if traits.packs else f'method {traits.name}'})"


def decide_attention(cfg: TrainConfig, *, packing: bool, native: bool, cuda: bool,
                     varlen_problem: str | None) -> tuple[bool, str | None]:
    """speed.attention: varlen FlashAttention on packed rows (True), or the model's own attention."""
    sp = cfg.speed
    if sp.attention == "model":
        return False, None
    why = []
    if not packing:
        why.append("data.packing is off")
    if not native:
        why.append("remote-code model")
    if not cuda:
        why.append("no CUDA GPU")
    elif varlen_problem:
        why.append(varlen_problem)
    if cfg.model.dtype == "fp32":
        why.append("model.dtype fp32 (FlashAttention needs bf16/fp16)")
    if sp.attention == "varlen":
        if why:
            raise ConfigError(f"speed.attention=varlen cannot run here: {'; '.join(why)}", field="speed.attention",
                              fix="run on a CUDA GPU with torch >= 2.10, bf16 and data.packing, "
                                  "or set speed.attention: auto (falls back to packed SDPA)")
        return True, None
    if cfg.model.attn_implementation not in ("sdpa", None):  # auto keeps an attention the config chose
        why.append(f"model.attn_implementation is {cfg.model.attn_implementation}")
    if not why:
        return True, None
    note = (f"speed.attention auto -> {cfg.model.attn_implementation or 'default'} packed path "
            f"(varlen off: {'; '.join(why)})") if packing else None
    return False, note


def decide_compile(cfg: TrainConfig, traits: MethodTraits, *, cuda: bool, native: bool,
                   distributed: str, moe: bool = False) -> tuple[bool, str | None]:
    """speed.compile: regional torch.compile of the decoder blocks. auto stays off on a
    mixture-of-experts model: on the H200 (torch 2.11) inductor's code for a GLM-4.7-Flash block
    failed at run time ("Invalid strides/sizes" in the grouped expert GEMMs) and the data-dependent
    routing made its compile outlast a 120 s run (bench/results/2026-12-02_s8/)."""
    sp = cfg.speed
    if sp.compile != "auto":
        if sp.compile and not native:
            raise ConfigError("speed.compile=true compiles transformers-native decoder blocks; this model runs "
                              "its own remote code", field="speed.compile", fix="set speed.compile: false")
        return bool(sp.compile), None
    why = ("no CUDA GPU" if not cuda else "remote-code model" if not native
           else "mixture-of-experts model: inductor fails on the grouped expert GEMMs" if moe
           else f"accelerate runs {distributed}" if distributed in SHARDED
           else None if traits.kernels else f"method {traits.name}")
    return (False, f"speed.compile auto -> off ({why})") if why else (True, None)


def decide_liger(cfg: TrainConfig, traits: MethodTraits, *, cuda: bool, native: bool, compile_on: bool,
                 distributed: str, liger_problem: str | None) -> tuple[str, str | None]:
    """speed.liger: none | flce | all. auto = flce when compile is on (compile fuses the elementwise
    ops itself), all otherwise."""
    sp = cfg.speed
    if sp.liger == "none":
        return "none", None
    if not cuda:
        why = "no CUDA GPU (liger-kernel's kernels are Triton GPU kernels)"
    elif not native:
        why = "remote-code model"
    else:
        why = liger_problem
    if not why and sp.liger == "auto" and not traits.kernels:
        why = f"method {traits.name}: its KV-cache prefixes are not checked with liger; set speed.liger to use it"
    if not why and sp.liger == "auto" and distributed in SHARDED:
        why = f"accelerate runs {distributed}: the fused loss reads the LM head's weight outside its forward"
    if why and sp.liger != "auto":
        raise ConfigError(f"speed.liger={sp.liger} cannot run here: {why}", field="speed.liger",
                          fix=f"on a CUDA GPU, {GPU_EXTRA} (installs liger-kernel); or set speed.liger: "
                              "auto or none")
    if why:
        return "none", f"speed.liger auto -> none ({why})"
    return (sp.liger if sp.liger != "auto" else "flce" if compile_on else "all"), None


def fused_lora_blockers(dtype: str, adapter_dtype: str, dropout: float, distributed: str, *,
                        key: str) -> list[str]:
    """Why fused LoRA would not engage (empty: it would): the adapter weights must have the
    activations' dtype (fp32 adapters on a bf16 model, and fp16, which loads fp32 weights under fp16
    autocast, run PEFT's forward), no dropout, each process holding whole layer weights (not FSDP /
    DeepSpeed shards). ``key``: the setting that gives adapters the model's dtype (train and align
    name it differently)."""
    adapters = "fp32" if adapter_dtype == "fp32" or dtype == "fp16" else dtype
    why = []
    if adapters != dtype:
        why.append(f"adapters {adapters}, activations {dtype}: every layer would run PEFT's forward; "
                   f"{key}: model fuses on bf16")
    if dropout > 0:
        why.append("method.dropout > 0 (a dropped-out input runs PEFT's forward)")
    if distributed not in ("NO", "MULTI_GPU"):
        why.append(f"accelerate runs {distributed}")
    return why


def decide_fused_lora(cfg: TrainConfig, traits: MethodTraits, *, distributed: str) -> tuple[bool, str | None]:
    """speed.fused_lora: exact, so auto is on wherever there is LoRA and it can engage: the adapter
    weights have the activations' dtype (fp16 loads fp32 weights under fp16 autocast, so never
    there), no dropout, each layer's own weights (not FSDP / DeepSpeed shards)."""
    sp = cfg.speed
    if sp.fused_lora is True and not traits.lora:
        raise ConfigError(f"speed.fused_lora=true fuses LoRA layers; method {traits.name} has none",
                          field="speed.fused_lora", fix="set speed.fused_lora: auto or false")
    if sp.fused_lora is False or not traits.lora:
        return False, None
    why = fused_lora_blockers(cfg.model.dtype, sp.adapter_dtype, cfg.method.dropout, distributed,
                              key="speed.adapter_dtype")
    if why and sp.fused_lora is True:
        raise ConfigError(f"speed.fused_lora=true cannot run here: {'; '.join(why)}", field="speed.fused_lora",
                          fix="set speed.fused_lora: auto (or speed.adapter_dtype: model)")
    return (False, f"speed.fused_lora auto -> off ({'; '.join(why)})") if why else (True, None)


def decide_expert_lora(cfg: TrainConfig, traits: MethodTraits, *, moe: bool,
                       distributed: str) -> tuple[bool, str | None]:
    """speed.expert_lora: the routed experts' LoRA through grouped GEMMs. Exact, so auto is on
    wherever there are LoRA'd experts and each process holds whole expert weights."""
    sp = cfg.speed
    if sp.expert_lora is True and not (traits.lora and moe):
        raise ConfigError(f"speed.expert_lora=true runs LoRA on routed experts; "
                          f"{'this model has none' if traits.lora else f'method {traits.name} has no LoRA'}",
                          field="speed.expert_lora", fix="set speed.expert_lora: auto or false")
    if sp.expert_lora is False or not (traits.lora and moe):
        return False, None
    if distributed not in ("NO", "MULTI_GPU"):
        if sp.expert_lora is True:
            raise ConfigError(f"speed.expert_lora=true reads each expert's whole weight; accelerate runs {distributed}",
                              field="speed.expert_lora", fix="set speed.expert_lora: auto")
        return False, f"speed.expert_lora auto -> off (accelerate runs {distributed}: sharded expert weights)"
    return True, None


def decide_fused_norm(cfg: TrainConfig, *, cuda: bool, compile_on: bool, liger: str) -> bool:
    """speed.fused_norm: exact in the forward (same ops), so auto is on wherever nothing else already
    handles the norms' saved tensors: compile's partitioner chooses them itself, liger's RMSNorm keeps
    its input as this does. On a CPU only when asked (tests)."""
    choice = cfg.speed.fused_norm
    if choice is False or liger == "all":
        return False
    return True if choice is True else cuda and not compile_on


def moe_notes(traits: MethodTraits, *, moe: bool) -> tuple[str, ...]:
    """What does not apply to a mixture-of-experts model, said once in the speed notes."""
    if not moe or not traits.quantized:
        return ()
    return ("qlora on a mixture-of-experts model: only the attention linears are 4-bit; the routed experts "
            "(fused 3-D parameters) and the MLP linears stay bf16 (bitsandbytes quantises nn.Linear only)",)


def decide_graphs(cfg: TrainConfig, traits: MethodTraits, *, cuda: bool, varlen: bool, processes: int,
                  distributed: str, moe: bool = False) -> tuple[bool, str | None]:
    """speed.cuda_graphs: the decoder blocks replayed as CUDA graphs over fixed-size rows."""
    sp = cfg.speed
    if sp.cuda_graphs is False:
        return False, None
    why = []
    if moe and sp.cuda_graphs == "auto" and traits.quantized:
        # routing changes the rows each expert gets every step, but the grouped GEMMs take their offsets
        # from the device (no host sync), so a MoE block captures. Measured for LoRA on the H200
        # (GLM-4.7-Flash shape, bench/RESULTS.md session 15: 1.13x the eager step at 80 % of its memory);
        # QLoRA's 4-bit attention next to routed experts is not, so it stays opt-in there
        why.append("mixture-of-experts QLoRA: capture is opt-in (speed.cuda_graphs: true)")
    if not cuda:
        why.append("no CUDA GPU")
    if not varlen:
        why.append("varlen attention is off")
    if not traits.lora:
        why.append(f"method {traits.name}")
    elif cfg.method.dropout > 0:
        why.append("method.dropout > 0 (random masks)")
    if sp.offload_activations:
        why.append("speed.offload_activations")
    if processes > 1 and distributed != "MULTI_GPU":
        why.append(f"accelerate runs {distributed} (graphs run with one process or DDP, whose "
                   "gradients are whole on every process)")
    elif processes > 1 and sp.cuda_graphs == "auto":
        # the graphed step does run per process (its own gradient all-reduce, tested on CPU), but on
        # 2xH200 capture under DDP failed (cudaErrorStreamCaptureInvalidated; also with dynamo's DDP
        # optimizer off and in thread_local capture mode, both tried and removed), and a capture
        # failing on one process only would leave the processes on different steps; so auto stays
        # eager under DDP, and speed.cuda_graphs: true is the explicit opt-in
        why.append(f"{processes} processes: capture under DDP is opt-in (speed.cuda_graphs: true)")
    if sp.cuda_graphs is True and why:
        raise ConfigError(f"speed.cuda_graphs=true cannot run here: {'; '.join(why)}", field="speed.cuda_graphs",
                          fix="on a CUDA GPU with varlen attention, method lora/qlora and method.dropout 0; "
                              "or set speed.cuda_graphs: auto")
    return (False, f"speed.cuda_graphs auto -> off ({'; '.join(why)})") if why else (True, None)


def graph_row_tokens(cfg: TrainConfig) -> int:
    """Tokens per graphed row: speed.graph_tokens, else the larger of 2048 and cutoff_len rounded up to 128."""
    return cfg.speed.graph_tokens or max(2048, -(-cfg.data.cutoff_len // 128) * 128)


def probe_kernels(cfg: TrainConfig, *, cuda: bool, native: bool, varlen_problem, liger_problem):
    """(varlen_problem, liger_problem): why each kernel cannot run here (None = it can); a value the
    caller gave is kept, False = probe it, and only where the lever could engage (liger-kernel's
    import pulls in triton)."""
    sp = cfg.speed
    if varlen_problem is False:
        varlen_problem = None
        if cuda and sp.attention != "model":
            from glmtune.models.speed import varlen_support
            varlen_problem = varlen_support()
    if liger_problem is False:
        liger_problem = None
        if cuda and native and sp.liger != "none":
            from glmtune.models.speed import liger_support
            liger_problem = liger_support(read_model_folder(cfg.model.path).model_type or "?")
    return varlen_problem, liger_problem


def resolve_speed(cfg: TrainConfig, *, cuda: bool | None = None, native: bool | None = None,
                  varlen_problem: str | None | bool = False, liger_problem: str | None | bool = False,
                  processes: int = 1, distributed: str = "NO", moe: bool | None = None) -> SpeedPlan:
    """Decide each lever. `varlen_problem` / `liger_problem`: why the kernel cannot run here (None = it
    can); left False they are probed. `processes` / `distributed`: accelerate's process count and
    DistributedType name. Raises ConfigError for an explicitly requested lever that can't run."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    native = is_native(cfg) if native is None else native
    moe = read_model_folder(cfg.model.path).routed_experts > 0 if moe is None else moe
    traits = method_traits(cfg.method.name)
    varlen_problem, liger_problem = probe_kernels(cfg, cuda=cuda, native=native, varlen_problem=varlen_problem,
                                                  liger_problem=liger_problem)
    packing, n_packing = decide_packing(cfg, traits, native=native)
    varlen, n_attention = decide_attention(cfg, packing=packing, native=native, cuda=cuda,
                                           varlen_problem=varlen_problem)
    # compile before liger: auto liger depends on it
    compile_on, n_compile = decide_compile(cfg, traits, cuda=cuda, native=native, distributed=distributed, moe=moe)
    liger, n_liger = decide_liger(cfg, traits, cuda=cuda, native=native, compile_on=compile_on,
                                  distributed=distributed, liger_problem=liger_problem)
    fused_lora, n_fused = decide_fused_lora(cfg, traits, distributed=distributed)
    graphs, n_graphs = decide_graphs(cfg, traits, cuda=cuda, varlen=varlen, processes=processes,
                                     distributed=distributed, moe=moe)
    expert_lora, n_experts = decide_expert_lora(cfg, traits, moe=moe, distributed=distributed)
    fused_norm = decide_fused_norm(cfg, cuda=cuda, compile_on=compile_on, liger=liger)
    notes = tuple(n for n in (n_packing, n_attention, n_compile, n_liger, n_fused, n_graphs, n_experts) if n)
    return SpeedPlan(packing=packing, varlen=varlen, liger=liger, compile=compile_on,
                     adapter_fp32=cfg.speed.adapter_dtype == "fp32", native=native, fused_lora=fused_lora,
                     graphs=graphs, graph_tokens=graph_row_tokens(cfg), expert_lora=expert_lora,
                     fused_norm=fused_norm, notes=notes + moe_notes(traits, moe=moe))


def faster_settings(cfg: TrainConfig, plan: SpeedPlan, *, cuda: bool) -> str | None:
    """The one-line suggestion `glmtune train` prints when the config itself blocks the fast levers
    (fused LoRA and CUDA graphs need dropout 0 and adapters in the model dtype); None when nothing
    the config says is in the way."""
    if not cuda or not method_traits(cfg.method.name).lora or cfg.model.dtype == "fp16":
        return None
    sets = []
    if cfg.method.dropout > 0:
        sets.append("method.dropout=0")
    if cfg.speed.adapter_dtype == "fp32":
        sets.append("speed.adapter_dtype=model")
    if not sets or (plan.fused_lora and plan.graphs):
        return None
    return ("faster: " + " ".join(f"--set {s}" for s in sets) + " turns on fused LoRA and CUDA graphs "
            "(GLM-4-9B LoRA through glmtune train on one H200: 5.83x the seed recipe's tokens/s with them; "
            "bench/RESULTS.md). "
            "Trade-offs: no dropout regularisation; bf16 adapter weights and updates.")


class SpeedLevers:
    """Applies a SpeedPlan and undoes it, in one place; `applied` records what engaged.

    Order: `before_model()` patches liger-kernel into transformers' classes (they must be patched
    before the model is built); `on_model(model)` switches attention to glmtune_varlen, routes LoRA
    layers through glmtune.models.fused_lora (before compile: compile traces the forward in place)
    and compiles the decoder blocks; `graphed_decoder(...)` captures CUDA graphs after
    accelerate.prepare; `undo()` restores all of it, so the returned model generates like any other
    (eager blocks, PEFT's forwards, its own attention) and transformers is unpatched.
    """

    def __init__(self, plan: SpeedPlan, cfg: TrainConfig):
        self.plan, self.cfg = plan, cfg
        # packing and the adapter dtype are applied by the batches and the method set-up, as planned
        self.applied = AppliedSpeed(packing=plan.packing, adapter_fp32=plan.adapter_fp32, notes=plan.notes)
        self._undo: list = []
        self._uncompile = None

    def before_model(self) -> None:
        if self.plan.liger == "none":
            return
        from glmtune.models.speed import liger_patch

        full = self.plan.liger == "all"
        undo = liger_patch(read_model_folder(self.cfg.model.path).model_type, fused_linear_cross_entropy=True,
                           rms_norm=full, swiglu=full)
        if undo is None:  # resolve_speed checked support; only a race with the environment gets here
            raise ConfigError("liger-kernel could not patch this model", field="speed.liger",
                              fix="set speed.liger: none")
        self._undo.append(undo)
        self.applied = replace(self.applied, liger=self.plan.liger)

    def on_model(self, model):
        from glmtune.models import speed as kernels

        plan = self.plan
        if plan.varlen:
            old = set_attention(model, kernels.register_varlen_attention())
            self._undo.append(lambda: set_attention(model, old))
            self.applied = replace(self.applied, varlen=True)
        if plan.fused_lora:
            self._fuse_lora(model)
        if plan.expert_lora:
            self._fuse_experts(model)
        if plan.fused_norm:
            self._fuse_norms(model)
        if plan.compile:
            try:
                kernels.compile_decoder_layers(model, dynamic=not plan.graphs)  # graphed rows have one shape
            except GlmtuneError as e:
                raise ConfigError(f"speed.compile: {e}", field="speed.compile", fix="set speed.compile: false") from None
            self._uncompile = lambda: kernels.uncompile_decoder_layers(model)
            self._undo.append(self._uncompile)
            self.applied = replace(self.applied, compile=True)
        return model

    def _fuse_lora(self, model) -> None:
        from glmtune.models.fused_lora import fuse_lora, unfuse_lora

        counts = fuse_lora(model)
        if counts["fused"] == 0:  # nothing would run fused (dtypes, ...): say so, don't claim it
            unfuse_lora(model)
            self.applied = self.applied.noting(
                f"speed.fused_lora -> off (0 of {counts['linear']} LoRA layers can run fused)")
            return
        self._undo.append(lambda: unfuse_lora(model))
        self.applied = replace(self.applied, fused_layers=(counts["fused"], counts["linear"]))

    def _fuse_experts(self, model) -> None:
        from glmtune.models.expert_lora import fuse_expert_lora, unfuse_expert_lora

        blocks = fuse_expert_lora(model)
        if blocks == 0:  # e.g. method.target_modules named no experts
            self.applied = self.applied.noting("speed.expert_lora -> off (no LoRA on routed experts)")
            return
        self._undo.append(lambda: unfuse_expert_lora(model))
        self.applied = replace(self.applied, expert_blocks=blocks)

    def _fuse_norms(self, model) -> None:
        from glmtune.models.rms_norm import fuse_rms_norms, unfuse_rms_norms

        norms = fuse_rms_norms(model)
        if norms:
            self._undo.append(lambda: unfuse_rms_norms(model))
            self.applied = replace(self.applied, fused_norms=norms)

    def graphed_decoder(self, model, lengths: list[int], token_mask=None):
        """Capture the decoder blocks as CUDA graphs for rows of plan.graph_tokens tokens; None when the
        plan has no graphs, or (auto) when capture fails, with the reason noted. A failed capture also
        turns compilation off: the compiled code may have run half-captured, and the eager step that
        follows must not depend on it."""
        plan = self.plan
        if not plan.graphs:
            return None
        from glmtune.train.graphs import GraphedDecoder

        max_segments = min(plan.graph_tokens // max(1, min(lengths)) + 1, 512)
        try:
            graphed = GraphedDecoder(model, tokens=plan.graph_tokens, max_segments=max_segments, graph=True,
                                     varlen=True, token_mask=token_mask)
        except Exception as e:  # noqa: BLE001 - any capture failure: auto falls back to the eager step
            if self.cfg.speed.cuda_graphs is True:
                raise ConfigError(f"speed.cuda_graphs: capture failed ({type(e).__name__}: {e})",
                                  field="speed.cuda_graphs", fix="set speed.cuda_graphs: auto or false") from e
            note = f"speed.cuda_graphs auto -> off (capture failed: {type(e).__name__}: {str(e)[:200]})"
            if self.applied.compile:
                self._undo.remove(self._uncompile)
                self._uncompile()
                note += "; speed.compile -> off with it"
            self.applied = self.applied.noting(note, compile=False)
            return None
        self.applied = replace(self.applied, graphs=True, graph_tokens=plan.graph_tokens)
        return graphed

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def set_attention(model, impl: str) -> str:
    """Switch the attention implementation of a loaded (possibly PEFT-wrapped) model; return the old one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = base.config._attn_implementation
    base.config._attn_implementation = impl
    return old
