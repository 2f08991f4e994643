"""The training config: one typed YAML file drives `glmtune train`.

Every field has a type, a default and a description; the descriptions are the `glmtune train
--explain` text and the comments of the shipped presets under `configs/`. Unknown keys fail
(`extra="forbid"`) so a typo such as `train.lr_rate` is an error naming the key, not a silent no-op.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glmtune.errors import ConfigError
from glmtune.models.peft_setup import method_traits


class ConfigSection(BaseModel):
    """Base of every config section (train's and align's): unknown keys and wrong types are errors."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(ConfigSection):
    path: str = Field(description="Local model folder (config.json + safetensors + tokenizer). Never downloaded.")
    dtype: Literal["bf16", "fp32", "fp16"] = Field(
        "bf16", description="Weight/compute dtype. GLM models must use bf16 or fp32: fp16 overflows in "
                            "their activations and gives NaN losses.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        "sdpa", description="Attention kernel. sdpa works everywhere; flash_attention_2 needs the flash-attn "
                            "package on a GPU. Packing uses each kernel's variable-length path.")
    trust_remote_code: bool = Field(
        False, description="Allow the model folder's own modelling code (needed for remote-code ChatGLM2/3 "
                           "checkpoints; HF-native GLM-4 folders don't need it).")


class DataSourceSection(ConfigSection):
    """What to read and how long a conversation may be: shared by `glmtune train` and `glmtune align`."""
    datasets: list[str] = Field(description="Training data: names from datasets.yaml or file paths "
                                            "(JSONL/JSON/CSV in any format `glmtune data convert` reads, "
                                            "auto-detected or named as PATH:FORMAT). One name or path may "
                                            "be given without a list (--set data.datasets=train.csv).")
    dev: str | None = Field(None, description="Dev split (registry name or file) for eval loss. "
                                              "Mutually exclusive with val_size.")
    registry: str | None = Field(None, description="datasets.yaml that names in datasets/dev are looked up in "
                                                   "(default ./datasets.yaml, as for `glmtune data`).")
    val_size: float = Field(0.0, ge=0, description="Hold out this share (<1) or count (>=1) of the training "
                                                   "records as the dev split (seeded shuffle).")
    template: str | None = Field(None, description="Chat template (glm4, glmz1, glm45, glm47, chatglm3, chatglm2, "
                                                   "qwen, llama3). Default: the model folder's glmtune.json.")
    cutoff_len: int = Field(1024, gt=0, description="Longest encoded conversation, in tokens.")
    on_overflow: Literal["truncate", "drop", "error"] = Field("truncate", description=(
        "A conversation longer than cutoff_len: truncate its dialogue text (truncate_side), drop it, or stop "
        "with an error. The system prompt and last answer are never cut; a record whose answer alone does not "
        "fit is dropped and counted. `glmtune data stats --cutoff` prints what training will do."))
    max_samples: int | None = Field(None, gt=0, description="Use only the first N training records (debugging).")

    @field_validator("datasets", mode="before")
    @classmethod
    def _one_dataset(cls, value: Any) -> Any:
        """`--set data.datasets=train.jsonl` parses as a string: a single source is a one-element list."""
        return [value] if isinstance(value, str) else value

    @field_validator("datasets")
    @classmethod
    def _some_dataset(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no training data (the list is empty). Fix: name at least one dataset: a "
                             "datasets.yaml name or a data file (JSONL/JSON/CSV)")
        return value


class DataSection(DataSourceSection):
    """`glmtune train`'s data: the sources, plus how conversations are encoded (cut, masked, packed)."""
    truncate_side: Literal["left", "right"] = Field("left", description=(
        "Dialogue text cut first: left = the oldest tokens (keeps the end next to the answer), right = the newest."))
    train_on: Literal["all_assistant", "last_assistant", "everything"] = Field(
        "all_assistant", description="Which tokens carry loss (the template's mask). GLM-4.5+ templates (glm45, "
                                     "glm47): the reasoning of turns before the last user message is not rendered, "
                                     "so not trained (as at inference); `\"keep_reasoning\": true` on an assistant "
                                     "message (or the record) renders and trains it.")
    packing: Union[bool, Literal["auto"]] = Field(
        "auto", description="Concatenate each micro-batch's conversations into one padding-free row with "
                            "position ids restarting per conversation; attention never crosses conversations "
                            "and the loss is the same as unpacked. auto: on, except for method prefix and "
                            "remote-code models (which would need an explicit T x T mask).")


class MethodCoreSection(ConfigSection):
    """The method and its LoRA keys: shared by `glmtune train` and `glmtune align`."""

    name: Literal["lora", "qlora", "prefix", "full", "freeze"] = Field(
        "lora", description="lora; qlora (LoRA on 4-bit nf4 weights, CUDA + bitsandbytes); prefix (P-Tuning v2 "
                            "= PEFT prefix tuning: trained key/value prefixes in every layer); full (all "
                            "weights); freeze (only the last `trainable_layers` blocks).")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    # 0.0 by default: dropout on the LoRA input costs a copy of every adapted activation (memory and a
    # kernel per layer) and fine-tuning runs of a few epochs rarely overfit enough to need it.
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 = off, saves an activation copy per layer).")
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = Field(
        "auto", description="Modules that get LoRA: auto (per architecture: GLM-4 q/k/v/o_proj, gate_up_proj, "
                            "down_proj; remote-code ChatGLM query_key_value, dense, dense_h_to_4h, dense_4h_to_h; "
                            "mixture-of-experts GLM-4.5+/4.7-Flash: attention, dense and shared-expert MLPs and the "
                            "routed experts, never the router), all-linear, or a list of module names (on a MoE model "
                            "`experts` names the routed experts).")
    train_router: bool = Field(False, description="Mixture-of-experts models: also train the routers' weights "
                                                  "(lora/qlora: in full, saved with the adapter). Off: the "
                                                  "routers stay as pretrained, so tokens keep their experts.")


class MethodSection(MethodCoreSection):
    """`glmtune train`'s methods: also prefix tuning and freeze."""
    num_virtual_tokens: int = Field(16, gt=0, description="prefix: virtual tokens (P-Tuning v2 pre_seq_len).")
    prefix_projection: bool = Field(False, description="prefix: reparameterise the prefix through an MLP.")
    trainable_layers: int = Field(2, gt=0, description="freeze: train the last N transformer blocks "
                                                        "(plus the final norm); everything else stays frozen.")


class TrainSection(ConfigSection):
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Conversations per micro-batch per process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step. Effective batch = "
                                                 "batch_size x grad_accum x processes.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup (transformers.get_scheduler).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of the optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, "
                                                            "~30% more compute.")
    seed: int = Field(42, description="Seed for init, data order and dropout.")
    log_every: int = Field(1, gt=0, description="Write a metrics line every N optimizer steps.")


class SpeedSection(ConfigSection):
    """Speed levers (issue 6, bench/RESULTS.md). `auto` turns a lever on where it is measured to help and
    is available (a CUDA GPU, liger-kernel installed, a transformers-native model) and logs why not
    otherwise; naming a lever explicitly makes a missing requirement an error instead."""
    attention: Literal["auto", "varlen", "model"] = Field(
        "auto", description="Attention for packed rows. varlen: FlashAttention's variable-length kernel "
                            "(torch.nn.attention.varlen; CUDA, bf16/fp16, data.packing) with no mask tensor; "
                            "model: model.attn_implementation's own packed path (SDPA with a block-diagonal "
                            "mask from the position ids); auto: varlen where it can run and "
                            "model.attn_implementation is sdpa, else model.")
    liger: Literal["auto", "none", "flce", "all"] = Field(
        "auto", description="liger-kernel fused kernels (CUDA; pip install -e \".[gpu]\"). flce: fused "
                            "linear + cross-entropy (the 151k-vocabulary logits are never materialised); all: "
                            "flce + RMSNorm + SwiGLU; auto: flce when compile is on (compile fuses the "
                            "elementwise ops itself), all otherwise; none without CUDA or liger-kernel, "
                            "and for method prefix.")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="Regional torch.compile of the decoder blocks (one compile serves every block; "
                            "seconds, not minutes). auto: on with CUDA for transformers-native models "
                            "(not method prefix); true also compiles on CPU (inductor, needs a C++ compiler).")
    adapter_dtype: Literal["fp32", "model"] = Field(
        "fp32", description="lora/qlora adapter weights: fp32 (PEFT's default: exact small updates) or model "
                            "(the model's dtype, e.g. bf16: no fp32 copy of every adapted activation, and "
                            "what fused LoRA and CUDA graphs need on bf16 models, but AdamW then updates bf16 "
                            "weights; for qlora the embeddings, norms and LM head also stay bf16 instead of "
                            "PEFT's fp32 upcast).")
    offload_activations: bool = Field(
        False, description="Keep the tensors autograd saves for backward (with gradient checkpointing: each "
                           "block's input) in pinned CPU memory: longer sequences fit, at a large cost in step "
                           "time. For long-context runs that do not fit otherwise.")
    fused_lora: Union[bool, Literal["auto"]] = Field(
        "auto", description="glmtune's fused LoRA (glmtune.models.fused_lora): each LoRA linear as 3 GEMMs with "
                            "the LoRA product added in the base GEMM's epilogue, and the SwiGLU product of "
                            "gated MLPs recomputed in backward instead of kept. Exact (tested against PEFT); "
                            "engages where the adapter has the base weights' dtype (speed.adapter_dtype: model "
                            "on bf16 models). auto: on for lora/qlora, single process or DDP.")
    cuda_graphs: Union[bool, Literal["auto"]] = Field(
        "auto", description="Train on packed rows of exactly speed.graph_tokens tokens and replay the decoder "
                            "blocks' forward and backward as CUDA graphs (glmtune.train.graphs): no per-kernel "
                            "CPU cost. Each micro-batch's conversations are packed best-fit into such rows (the "
                            "rest padded). Needs CUDA, varlen attention, lora/qlora with method.dropout 0, one "
                            "process, no offload_activations. auto: on where all of that holds. GLM-4-9B LoRA "
                            "through glmtune train on one H200, with fused LoRA: 5.83x the seed recipe's "
                            "tokens/s at less memory (bench/RESULTS.md).")
    expert_lora: Union[bool, Literal["auto"]] = Field(
        "auto", description="Mixture-of-experts LoRA: run the routed experts' adapters through grouped GEMMs beside "
                            "the frozen expert weights (glmtune.models.expert_lora) instead of PEFT's forward, which "
                            "adds B A into a full copy of every expert's weight per layer and call. Exact (tested "
                            "against PEFT). auto: on for lora/qlora on MoE models, single process or DDP.")
    fused_norm: Union[bool, Literal["auto"]] = Field(
        "auto", description="RMSNorms that keep their input for backward, not an fp32 copy of it "
                            "(glmtune.models.rms_norm; same output, 4 bytes less per hidden value per norm). "
                            "auto: on with CUDA where neither speed.compile nor liger's RMSNorm (speed.liger: "
                            "all) runs, e.g. GLM-4.7-Flash (the mixture-of-experts models compile skips).")
    graph_tokens: int | None = Field(
        None, gt=0, description="Tokens per CUDA-graphed row (default: the larger of 2048 and data.cutoff_len "
                                "rounded up to 128). Memory grows with it (GLM-4-9B: ~6 MB per token).")


class EvalSection(ConfigSection):
    every: int = Field(0, ge=0, description="Eval loss on the dev split every N optimizer steps (0 = only at the end).")
    batch_size: int | None = Field(None, gt=0, description="Eval micro-batch size (default: train.batch_size).")


class RunOutputSection(ConfigSection):
    """Where a run writes: shared by `glmtune train` and `glmtune align`."""

    dir: str = Field(description="Output folder: checkpoints, final adapter, metrics.jsonl, loss.png, config.yaml.")
    save_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = Field(3, gt=0, description="Keep only the newest K step checkpoints.")
    plot: bool = Field(True, description="Refresh loss.png as training runs.")
    tensorboard: bool = Field(True, description="Write TensorBoard logs under DIR/tensorboard.")


class OutputSection(RunOutputSection):
    """`glmtune train`'s output: also the step profiler."""
    profile_steps: int = Field(0, ge=0, description="Profile N optimizer steps after 5 warm-up steps (torch.profiler): "
                                                    "DIR/profile.txt says how busy the GPU was and which ops took "
                                                    "the time; DIR/profile_trace.json opens in Perfetto.")


class TrainConfig(ConfigSection):
    model: ModelSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    speed: SpeedSection = Field(default_factory=SpeedSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.data.dev and self.data.val_size:
            raise ValueError("data.dev and data.val_size are mutually exclusive")
        method = method_traits(self.method.name)
        if not method.packs and self.data.packing is True:
            raise ValueError("data.packing does not work with method.name=prefix (prefix tuning feeds a KV "
                             "cache, and packed attention needs an empty one)")
        if self.speed.attention == "varlen":
            if self.data.packing is False or not method.packs:
                raise ValueError("speed.attention=varlen runs on packed rows: set data.packing: true (or auto), "
                                 "not with method prefix; or set speed.attention: auto")
            if self.model.dtype == "fp32":
                raise ValueError("speed.attention=varlen (FlashAttention) computes in bf16/fp16, not "
                                 "model.dtype fp32: set model.dtype: bf16 or speed.attention: auto")
        if self.speed.graph_tokens is not None and self.speed.graph_tokens < self.data.cutoff_len:
            raise ValueError(f"speed.graph_tokens ({self.speed.graph_tokens}) must hold the longest conversation: "
                             f"set it >= data.cutoff_len ({self.data.cutoff_len})")
        if self.method.train_router and self.method.name == "prefix":
            raise ValueError("method.train_router does not apply to method prefix (it trains no weights of the "
                             "model). Fix: remove method.train_router")
        if self.speed.adapter_dtype == "model" and not method.lora:
            raise ValueError("speed.adapter_dtype=model applies to method lora/qlora only")
        return self


# --------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> validated TrainConfig, with errors that name the key

def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if not isinstance(d.get(k, {}), dict):
            raise ConfigError("cannot set a sub-key of a non-section value", field=dotted)
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4). The value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE", fix="write e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value {raw!r} ({getattr(e, 'problem', None) or 'invalid YAML'})",
                          field=key.strip(), fix="write a YAML value: 1e-4, true, [a, b] or a quoted string") from None
    return key.strip(), value


def config_error(e: ValidationError, source: str | None) -> ConfigError:
    """pydantic's first error as a one-line ConfigError naming the key (``source``: the YAML file)."""
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return ConfigError("unknown key", file=source, field=key,
                           fix="check the spelling; `glmtune train --explain` lists every key")
    if err["type"] == "missing":
        return ConfigError("required key is missing", file=source, field=key)
    if err["type"] == "value_error":  # our own validators' messages: the problem, with what to do
        problem, _, fix = str(err.get("ctx", {}).get("error", err["msg"])).partition(" Fix: ")
        return ConfigError(problem, file=source, field=key, fix=fix or None)
    got = err.get("input")
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    return ConfigError(f"{err['msg']}{got}", file=source, field=key)


def validate_config(raw: dict, source: str | None = None, *, check_paths: bool = True) -> TrainConfig:
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise config_error(e, source) from None
    if check_paths:
        check_model(cfg, source)
    return cfg


def load_config(path: str | Path | dict, overrides: list[str] | None = None, *,
                check_paths: bool = True) -> TrainConfig:
    """Read a YAML config (or a dict), apply `KEY=VALUE` overrides, validate, check the model folder."""
    raw, source = read_raw_config(path, overrides)
    return validate_config(raw, source, check_paths=check_paths)


def read_raw_config(path: str | Path | dict, overrides: list[str] | None = None) -> tuple[dict, str | None]:
    """A YAML file (or a dict) with `KEY=VALUE` overrides applied -> (mapping, file name or None)."""
    if isinstance(path, dict):
        raw, source = json.loads(json.dumps(path)), None
    else:
        from glmtune.io import read_text_utf8
        source = str(path)
        try:
            raw = yaml.safe_load(read_text_utf8(path)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ConfigError(f"invalid YAML ({getattr(e, 'problem', e)})", file=source,
                              line=mark.line + 1 if mark else None) from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a YAML mapping", file=source)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return raw, source


def check_model(cfg: TrainConfig, source: str | None = None) -> None:
    """Checks that need the model folder: it exists, and fp16 is not asked of a GLM model."""
    from glmtune.errors import ModelNotFoundError
    from glmtune.models.folder import read_model_folder
    from glmtune.models.loading import check_model_dir

    try:
        check_model_dir(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except ModelNotFoundError as e:
        raise ConfigError(str(e).rstrip("."), file=source, field="model.path") from None
    if cfg.model.dtype == "fp16" and read_model_folder(cfg.model.path).is_glm:
        raise ConfigError("fp16 is not supported for GLM models: their activations overflow fp16 and the loss "
                          "becomes NaN", file=source, field="model.dtype",
                          fix="use dtype: bf16 (Ampere or newer GPUs) or fp32")
    if method_traits(cfg.method.name).quantized and cfg.model.dtype == "fp32":
        raise ConfigError("qlora computes in bf16 (nf4 weights, bf16 compute)", file=source,
                          field="model.dtype", fix="use dtype: bf16")


def resolve_template(cfg: TrainConfig):
    """The Template to train with: data.template, else the model folder's (glmtune.json, its chat
    template); the folder's own details (a default system prompt) are kept either way."""
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template
    return get_template(**read_model_folder(cfg.model.path).template_args(cfg.data.template))


def save_resolved(cfg: TrainConfig, out_dir: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) as DIR/config.yaml, atomically."""
    from glmtune.io import write_text_atomic
    path = Path(out_dir) / "config.yaml"
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    return path


def explain(model: type[BaseModel] = TrainConfig, indent: int = 0) -> str:
    """Commented YAML of every key with its default: the reference for configs (`--explain`)."""
    lines = []
    pad = "  " * indent
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(explain(ann, indent + 1))
            continue
        default = "REQUIRED" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
        lines.append(f"{pad}{name}: {default}  # {field.description or ''}")
    return "\n".join(lines)
