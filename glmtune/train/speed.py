"""The config's `speed` section (and data.packing: auto) resolved against this machine and model,
and applied / undone in one place.

`resolve_speed` decides every lever once, before anything heavy loads. It is pure given what it is
told about the machine (CUDA, varlen kernel, liger-kernel, accelerate's processes), so every branch
is testable on a CPU: `auto` levers that cannot run fall back with a note that run_training logs;
levers named explicitly that cannot run are a ConfigError naming the key and the fix.
`SpeedLevers` applies the plan (liger before the model is built, attention / fused LoRA / compile on
the loaded model, CUDA graphs after accelerate.prepare), records what engaged for the speed line, and
undoes it all. The kernels themselves live in glmtune.models.speed and glmtune.models.fused_lora.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from glmtune.errors import ConfigError
from glmtune.models.folder import read_model_folder
from glmtune.models.peft_setup import method_traits
from glmtune.train.config import TrainConfig

GPU_EXTRA = 'pip install -e ".[gpu]"'


@dataclass
class SpeedPlan:
    packing: bool
    varlen: bool = False          # attention = glmtune_varlen (FlashAttention varlen) on packed rows
    liger: str = "none"           # none | flce | all
    compile: bool = False         # regional torch.compile of the decoder blocks
    adapter_fp32: bool = True     # PEFT autocast_adapter_dtype
    native: bool = True           # transformers-native modelling code (reads packing from position ids)
    fused_lora: bool = False      # glmtune.models.fused_lora
    graphs: bool = False          # CUDA-graphed decoder blocks over fixed rows (glmtune.train.graphs)
    graph_tokens: int = 0         # tokens per graphed row
    notes: list[str] = field(default_factory=list)
    fused_layers: tuple[int, int] | None = None  # (LoRA layers running fused, LoRA layers), once applied

    @property
    def fused_loss(self) -> bool:
        """liger's fused linear + cross-entropy computes the loss inside the model's forward."""
        return self.liger != "none"

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
        if self.fused_lora:
            on.append("fused LoRA" + (f" ({self.fused_layers[0]} of {self.fused_layers[1]} LoRA layers)"
                                      if self.fused_layers else ""))
        if self.graphs:
            on.append(f"CUDA graphs ({self.graph_tokens}-token rows)")
        return "speed: " + ", ".join(on)


def is_native(cfg: TrainConfig) -> bool:
    """Whether transformers' own modelling code will load this folder (not the folder's remote code)."""
    return not (cfg.model.trust_remote_code and read_model_folder(cfg.model.path).remote_code)


def resolve_speed(cfg: TrainConfig, *, cuda: bool | None = None, native: bool | None = None,
                  varlen_problem: str | None | bool = False, liger_problem: str | None | bool = False,
                  processes: int = 1, distributed: str = "NO") -> SpeedPlan:
    """Decide each lever. `varlen_problem` / `liger_problem`: why the kernel cannot run here (None = it
    can); left False they are probed. `processes` / `distributed`: accelerate's process count and
    DistributedType name. Raises ConfigError for an explicitly requested lever that can't run."""
    import torch

    sp = cfg.speed
    cuda = torch.cuda.is_available() if cuda is None else cuda
    native = is_native(cfg) if native is None else native
    method = cfg.method.name
    traits = method_traits(method)
    notes: list[str] = []

    # packing: auto = on wherever transformers reads packing from position ids
    if cfg.data.packing == "auto":
        packing = traits.packs and native
        if not packing:
            notes.append(f"data.packing auto -> off ({'remote-code model' if traits.packs else f'method {method}'})")
    else:
        packing = bool(cfg.data.packing)

    # attention
    varlen = False
    if sp.attention != "model":
        why = []
        if not packing:
            why.append("data.packing is off")
        if not native:
            why.append("remote-code model")
        if not cuda:
            why.append("no CUDA GPU")
        else:
            if varlen_problem is False:
                from glmtune.models.speed import varlen_support
                varlen_problem = varlen_support()
            vp = varlen_problem
            if vp:
                why.append(vp)
        if cfg.model.dtype == "fp32":
            why.append("model.dtype fp32 (FlashAttention needs bf16/fp16)")
        if sp.attention == "varlen" and why:
            raise ConfigError(f"speed.attention=varlen cannot run here: {'; '.join(why)}", field="speed.attention",
                              fix="run on a CUDA GPU with torch >= 2.10, bf16 and data.packing, "
                                  "or set speed.attention: auto (falls back to packed SDPA)")
        if sp.attention == "auto" and cfg.model.attn_implementation not in ("sdpa", None):
            why.append(f"model.attn_implementation is {cfg.model.attn_implementation}")
        varlen = not why
        if sp.attention == "auto" and why and packing:
            notes.append(f"speed.attention auto -> {cfg.model.attn_implementation or 'default'} packed path "
                         f"(varlen off: {'; '.join(why)})")

    # compile (decided before liger: auto liger depends on it). Sharded weights (FSDP, DeepSpeed) are
    # gathered by hooks around each module's forward: compiled blocks and liger's fused loss, which
    # reads the LM head's weight outside the head's forward, are not what those hooks expect (on
    # 2xH200, FSDP2 + liger: "aten.mm.out got mixed torch.Tensor and DTensor"), so auto leaves them off.
    sharded = distributed in ("FSDP", "DEEPSPEED")
    if sp.compile == "auto":
        compile_on = cuda and native and traits.kernels and not sharded
        if not compile_on:
            notes.append("speed.compile auto -> off (" + ("no CUDA GPU" if not cuda else
                         "remote-code model" if not native else f"accelerate runs {distributed}" if sharded
                         else f"method {method}") + ")")
    else:
        compile_on = bool(sp.compile)
        if compile_on and not native:
            raise ConfigError("speed.compile=true compiles transformers-native decoder blocks; this model runs "
                              "its own remote code", field="speed.compile", fix="set speed.compile: false")

    # liger
    liger = "none"
    if sp.liger != "none":
        model_type = read_model_folder(cfg.model.path).model_type or "?"
        if not cuda:
            why = "no CUDA GPU (liger-kernel's kernels are Triton GPU kernels)"
        elif not native:
            why = "remote-code model"
        else:
            if liger_problem is False:
                from glmtune.models.speed import liger_support
                liger_problem = liger_support(model_type)
            why = liger_problem
        if not why and sp.liger == "auto" and not traits.kernels:
            why = f"method {method}: its KV-cache prefixes are not checked with liger; set speed.liger to use it"
        if not why and sp.liger == "auto" and sharded:
            why = f"accelerate runs {distributed}: the fused loss reads the LM head's weight outside its forward"
        if why and sp.liger != "auto":
            raise ConfigError(f"speed.liger={sp.liger} cannot run here: {why}", field="speed.liger",
                              fix=f"on a CUDA GPU, {GPU_EXTRA} (installs liger-kernel); or set speed.liger: "
                                  "auto or none")
        if why:
            notes.append(f"speed.liger auto -> none ({why})")
        else:
            liger = sp.liger if sp.liger != "auto" else ("flce" if compile_on else "all")

    adapter_fp32 = sp.adapter_dtype == "fp32"
    lora_like = traits.lora

    # fused LoRA: exact, so auto is on wherever there is LoRA
    if sp.fused_lora is True and not lora_like:
        raise ConfigError(f"speed.fused_lora=true fuses LoRA layers; method {method} has none",
                          field="speed.fused_lora", fix="set speed.fused_lora: auto or false")
    # it engages where the adapter weights have the activations' dtype (fp16 loads fp32 weights under
    # fp16 autocast, so never there); it reads each layer's own weights (not FSDP / DeepSpeed shards)
    fused_lora = False
    if sp.fused_lora is not False and lora_like:
        act = cfg.model.dtype
        adapters = "fp32" if adapter_fp32 or act == "fp16" else act
        why = []
        if adapters != act:
            why.append(f"adapters {adapters}, activations {act}: every layer would run PEFT's forward; "
                       "speed.adapter_dtype: model fuses on bf16")
        if cfg.method.dropout > 0:
            why.append("method.dropout > 0 (a dropped-out input runs PEFT's forward)")
        if distributed not in ("NO", "MULTI_GPU"):
            why.append(f"accelerate runs {distributed}")
        if why and sp.fused_lora is True:
            raise ConfigError(f"speed.fused_lora=true cannot run here: {'; '.join(why)}", field="speed.fused_lora",
                              fix="set speed.fused_lora: auto (or speed.adapter_dtype: model)")
        if why:
            notes.append(f"speed.fused_lora auto -> off ({'; '.join(why)})")
        fused_lora = not why

    # CUDA graphs over fixed-size rows
    graphs = False
    graph_tokens = sp.graph_tokens or max(2048, -(-cfg.data.cutoff_len // 128) * 128)
    if sp.cuda_graphs is not False:
        why = []
        if not cuda:
            why.append("no CUDA GPU")
        if not varlen:
            why.append("varlen attention is off")
        if not lora_like:
            why.append(f"method {method}")
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
        graphs = not why
        if why:
            notes.append(f"speed.cuda_graphs auto -> off ({'; '.join(why)})")
    return SpeedPlan(packing=packing, varlen=varlen, liger=liger, compile=compile_on, adapter_fp32=adapter_fp32,
                     native=native, fused_lora=fused_lora, graphs=graphs, graph_tokens=graph_tokens, notes=notes)


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
            "(GLM-4-9B LoRA on an H200: 5.8x the seed recipe's tokens/s instead of 2.6x; bench/RESULTS.md). "
            "Trade-offs: no dropout regularisation; bf16 adapter weights and updates.")


class SpeedLevers:
    """Applies a SpeedPlan and undoes it, in one place.

    Order: `before_model()` patches liger-kernel into transformers' classes (they must be patched
    before the model is built); `on_model(model)` switches attention to glmtune_varlen, routes LoRA
    layers through glmtune.models.fused_lora (before compile: compile traces the forward in place)
    and compiles the decoder blocks; `graphed_decoder(...)` captures CUDA graphs after
    accelerate.prepare; `undo()` restores all of it, so the returned model generates like any other
    (eager blocks, PEFT's forwards, its own attention) and transformers is unpatched.
    """

    def __init__(self, plan: SpeedPlan, cfg: TrainConfig, console=None):
        self.plan, self.cfg, self.console = plan, cfg, console
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

    def on_model(self, model):
        from glmtune.models import speed as kernels

        plan = self.plan
        if plan.varlen:
            old = set_attention(model, kernels.register_varlen_attention())
            self._undo.append(lambda: set_attention(model, old))
        if plan.fused_lora:
            from glmtune.models.fused_lora import fuse_lora, unfuse_lora
            counts = fuse_lora(model)
            self._undo.append(lambda: unfuse_lora(model))
            plan.fused_layers = (counts["fused"], counts["linear"])
            if counts["fused"] == 0:  # nothing would run fused (dtypes, ...): say so, don't claim it
                self._undo.pop()()
                plan.fused_lora = False
                plan.notes.append(f"speed.fused_lora -> off (0 of {counts['linear']} LoRA layers can run fused)")
        if plan.compile:
            try:
                kernels.compile_decoder_layers(model, dynamic=not plan.graphs)  # graphed rows have one shape
            except ValueError as e:
                raise ConfigError(f"speed.compile: {e}", field="speed.compile", fix="set speed.compile: false") from None
            self._uncompile = lambda: kernels.uncompile_decoder_layers(model)
            self._undo.append(self._uncompile)
        return model

    def graphed_decoder(self, model, lengths: list[int]):
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
            return GraphedDecoder(model, tokens=plan.graph_tokens, max_segments=max_segments, graph=True, varlen=True)
        except Exception as e:  # noqa: BLE001 - any capture failure: auto falls back to the eager step
            if self.cfg.speed.cuda_graphs is True:
                raise ConfigError(f"speed.cuda_graphs: capture failed ({type(e).__name__}: {e})",
                                  field="speed.cuda_graphs", fix="set speed.cuda_graphs: auto or false") from e
            plan.graphs = False
            note = f"speed.cuda_graphs auto -> off (capture failed: {type(e).__name__}: {str(e)[:200]})"
            if plan.compile and self._uncompile is not None:
                self._uncompile()
                plan.compile = False
                note += "; speed.compile -> off with it"
            plan.notes.append(note)
            if self.console is not None:
                self.console.print(f"[yellow]·[/] {note}")
            return None

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def set_attention(model, impl: str) -> str:
    """Switch the attention implementation of a loaded (possibly PEFT-wrapped) model; return the old one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = base.config._attn_implementation
    base.config._attn_implementation = impl
    return old
