"""The config's `speed` section (and data.packing: auto) resolved against this machine and model.

`resolve_speed` is pure given what it is told about the machine (CUDA, varlen kernel, liger-kernel),
so every branch is testable on a CPU: `auto` levers that cannot run fall back with a note that
run_training logs; levers named explicitly that cannot run are a ConfigError naming the key and the
fix. The kernels themselves live in glmtune.models.speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from glmtune.errors import ConfigError
from glmtune.models.folder import read_model_folder
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

    @property
    def fused_loss(self) -> bool:
        """liger's fused linear + cross-entropy computes the loss inside the model's forward."""
        return self.liger != "none"

    def summary(self) -> str:
        attn = "varlen FlashAttention" if self.varlen else "model attention"
        graphs = f", CUDA graphs on ({self.graph_tokens}-token rows)" if self.graphs else ""
        return (f"speed: packing {'on (' + attn + ')' if self.packing else 'off'}, liger {self.liger}, "
                f"compile {'on' if self.compile else 'off'}, adapters {'fp32' if self.adapter_fp32 else 'model dtype'}"
                f"{', fused LoRA' if self.fused_lora else ''}{graphs}")


def is_native(cfg: TrainConfig) -> bool:
    """Whether transformers' own modelling code will load this folder (not the folder's remote code)."""
    return not (cfg.model.trust_remote_code and read_model_folder(cfg.model.path).remote_code)


def resolve_speed(cfg: TrainConfig, *, cuda: bool | None = None, native: bool | None = None,
                  varlen_problem: str | None | bool = False, liger_problem: str | None | bool = False) -> SpeedPlan:
    """Decide each lever. `varlen_problem` / `liger_problem`: why the kernel cannot run here (None = it
    can); left False they are probed. Raises ConfigError for an explicitly requested lever that can't run."""
    import torch

    sp = cfg.speed
    cuda = torch.cuda.is_available() if cuda is None else cuda
    native = is_native(cfg) if native is None else native
    method = cfg.method.name
    notes: list[str] = []

    # packing: auto = on wherever transformers reads packing from position ids
    if cfg.data.packing == "auto":
        packing = method != "prefix" and native
        if not packing:
            notes.append(f"data.packing auto -> off ({'method prefix' if method == 'prefix' else 'remote-code model'})")
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

    # compile (decided before liger: auto liger depends on it)
    if sp.compile == "auto":
        compile_on = cuda and native and method != "prefix"
        if not compile_on:
            notes.append("speed.compile auto -> off (" + ("no CUDA GPU" if not cuda else
                         "remote-code model" if not native else "method prefix") + ")")
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
        if not why and sp.liger == "auto" and method == "prefix":
            why = "method prefix: its KV-cache prefixes are not checked with liger; set speed.liger to use it"
        if why and sp.liger != "auto":
            raise ConfigError(f"speed.liger={sp.liger} cannot run here: {why}", field="speed.liger",
                              fix=f"on a CUDA GPU, {GPU_EXTRA} (installs liger-kernel); or set speed.liger: "
                                  "auto or none")
        if why:
            notes.append(f"speed.liger auto -> none ({why})")
        else:
            liger = sp.liger if sp.liger != "auto" else ("flce" if compile_on else "all")

    adapter_fp32 = sp.adapter_dtype == "fp32"
    lora_like = method in ("lora", "qlora")

    # fused LoRA: exact, so auto is on wherever there is LoRA
    if sp.fused_lora is True and not lora_like:
        raise ConfigError(f"speed.fused_lora=true fuses LoRA layers; method {method} has none",
                          field="speed.fused_lora", fix="set speed.fused_lora: auto or false")
    fused_lora = lora_like and sp.fused_lora is not False

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
        if sp.cuda_graphs is True and why:
            raise ConfigError(f"speed.cuda_graphs=true cannot run here: {'; '.join(why)}", field="speed.cuda_graphs",
                              fix="on a CUDA GPU with varlen attention, method lora/qlora and method.dropout 0; "
                                  "or set speed.cuda_graphs: auto")
        graphs = not why
        if why:
            notes.append(f"speed.cuda_graphs auto -> off ({'; '.join(why)})")
    return SpeedPlan(packing=packing, varlen=varlen, liger=liger, compile=compile_on, adapter_fp32=adapter_fp32,
                     native=native, fused_lora=fused_lora, graphs=graphs, graph_tokens=graph_tokens, notes=notes)


def apply_liger(plan: SpeedPlan, cfg: TrainConfig):
    """Patch transformers with liger-kernel before the model is built; returns the undo function (or None)."""
    if plan.liger == "none":
        return None
    from glmtune.models.speed import liger_patch

    full = plan.liger == "all"
    undo = liger_patch(read_model_folder(cfg.model.path).model_type, fused_linear_cross_entropy=True, rms_norm=full, swiglu=full)
    if undo is None:  # resolve_speed checked support; only a race with the environment gets here
        raise ConfigError("liger-kernel could not patch this model", field="speed.liger", fix="set speed.liger: none")
    return undo


def set_attention(model, impl: str) -> str:
    """Switch the attention implementation of a loaded (possibly PEFT-wrapped) model; return the old one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = base.config._attn_implementation
    base.config._attn_implementation = impl
    return old
