"""Turn a loaded causal LM into a trainable one for each method: lora, qlora, prefix, full, freeze.

One function per concern: which modules get LoRA (per architecture), which blocks a `freeze` run
trains, how QLoRA quantises. PEFT does the adapter work; this file only chooses its arguments.
`METHODS` is the one table of what each method is (LoRA? quantized? updates the base? packs?).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from glmtune.errors import ConfigError

# LoRA targets per model_type (config.json). HF-native GLM-4 fuses gate+up into one projection;
# the remote-code ChatGLM2/3/GLM-4 layout fuses q, k and v into `query_key_value`.
LORA_TARGETS = {
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model, choice) -> list[str] | str:
    """`auto` -> the architecture's list (or PEFT's `all-linear` for an unknown one); lists pass through,
    after checking each name exists in the model so a typo fails here, not as a silent no-op."""
    if choice == "all-linear":
        return "all-linear"
    if choice == "auto":
        return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in choice if t not in names]
    if missing:
        raise ConfigError(f"no module named {missing} in this model (it has e.g. "
                          f"{sorted(n for n in names if 'proj' in n or 'dense' in n)[:8]})",
                          field="method.target_modules", fix="use auto or all-linear")
    return list(choice)


def apply_freeze(model, trainable_layers: int) -> None:
    """Train the last N blocks and the final norm; embeddings, earlier blocks and the LM head stay frozen."""
    from glmtune.models.loading import find_decoder

    layers = find_decoder(model).layers
    if trainable_layers > len(layers):
        raise ConfigError(f"the model has only {len(layers)} layers", field="method.trainable_layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)
    for name in ("model.norm", "transformer.encoder.final_layernorm"):
        obj = model
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
            obj.requires_grad_(True)
        except AttributeError:
            pass


def qlora_quant_config(*, moe: bool = False):
    """nf4 weights with double quantisation (quantised quantisation constants, ~0.4 bit/param saved)
    and bf16 compute, as in the QLoRA paper (Dettmers et al. 2023, sec. 3).

    bitsandbytes quantises nn.Linear layers only: on a mixture-of-experts model (``moe``) the routed
    experts (fused 3-D parameters) stay in bf16 whatever this says, and the dense / shared-expert
    MLP linears are kept out too, because their LoRA is a parameter target (glmtune.models.moe)
    that needs a plain weight; only the attention linears become 4-bit."""
    import torch
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("qlora needs the bitsandbytes package", field="method.name",
                          fix="pip install bitsandbytes (CUDA GPU), or use method lora") from None
    if not torch.cuda.is_available():
        raise ConfigError("qlora needs a CUDA GPU (bitsandbytes 4-bit kernels)", field="method.name",
                          fix="run on a GPU machine, or use method lora on CPU")
    from transformers import BitsAndBytesConfig
    skip = {"llm_int8_skip_modules": ["lm_head", *MOE_UNQUANTIZED]} if moe else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, **skip)


# module-name suffixes a MoE model's QLoRA keeps in bf16 (see qlora_quant_config)
MOE_UNQUANTIZED = ("gate_proj", "up_proj", "down_proj")


def setup_method(model, method, *, gradient_checkpointing: bool = False, adapter_fp32: bool = True,
                 task_type: str = "CAUSAL_LM"):
    """Return the model to train (a PeftModel for lora/qlora/prefix, the model itself for full/freeze).

    `method` is a MethodSection. Gradient checkpointing is switched on here because PEFT's kbit
    preparation and the input-grad hook must see it before adapters are injected. `adapter_fp32=False`
    keeps LoRA weights in the base model's dtype (PEFT `autocast_adapter_dtype=False`): no fp32 copy of
    every adapted activation (speed.adapter_dtype: model); for qlora the non-quantized weights also stay
    in the model dtype instead of PEFT's fp32 upcast. `task_type`: PEFT's task of the adapter (SEQ_CLS
    for a reward model's scalar head, which PEFT then trains and saves with the adapter).
    """
    traits = method_traits(method.name)
    gc_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs and with DDP
    if traits.quantized:
        from glmtune.models.moe import is_moe

        # PEFT's kbit preparation upcasts every weight bitsandbytes left in bf16 to fp32: on a MoE
        # model that is all routed experts (GLM-4.7-Flash: 56 GB more), so MoE skips it
        _prepare_quantized(model, gradient_checkpointing, gc_kwargs, upcast=adapter_fp32 and not is_moe(model))
    elif gradient_checkpointing:
        enable_checkpointing(model, gc_kwargs)
        if traits.frozen_embeddings:
            # the embeddings are frozen, so checkpointed blocks would see inputs without grad
            model.enable_input_require_grads()
    return traits.apply(model, method, adapter_fp32, task_type)


def enable_checkpointing(model, checkpoint_kwargs: dict) -> None:
    """Switch on activation (gradient) checkpointing with ``torch.utils.checkpoint`` kwargs.

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and warns (FutureWarning) on the old name; older releases have only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def _prepare_quantized(model, gradient_checkpointing: bool, gc_kwargs: dict, *, upcast: bool) -> None:
    if upcast:
        from peft import prepare_model_for_kbit_training
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs=gc_kwargs)
        return
    # PEFT's kbit preparation minus its fp32 upcast of every non-quantized weight (embeddings, norms,
    # LM head: +2.3 GiB for GLM-4's 151,552 x 4096 head alone); non-reentrant checkpointing needs
    # no input-grad hook.
    model.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model, gc_kwargs)


def _add_lora(model, method, adapter_fp32: bool, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    from glmtune.models.moe import is_moe

    if is_moe(model):
        return get_peft_model(model, moe_lora_config(model, method), autocast_adapter_dtype=adapter_fp32)
    if method.train_router:
        raise ConfigError("method.train_router applies to mixture-of-experts models; this one has no router",
                          field="method.train_router", fix="remove it")
    cfg = LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, bias="none",
                     target_modules=lora_targets(model, method.target_modules), task_type=task_type)
    return get_peft_model(model, cfg, autocast_adapter_dtype=adapter_fp32)


def moe_lora_config(model, method):
    """LoRA on attention (modules), dense / shared MLPs and routed experts (parameters); the router
    only with method.train_router (trained in full, saved with the adapter)."""
    from peft import LoraConfig

    from glmtune.models.moe import ROUTER, lora_spec

    if method.dropout > 0:
        raise ConfigError("LoRA dropout does not work on mixture-of-experts parameters (PEFT's parameter LoRA "
                          "adds B A to the weight, so the input cannot be dropped per LoRA branch)",
                          field="method.dropout", fix="set method.dropout: 0")
    modules, params = lora_spec(model, method.target_modules)
    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=0.0, bias="none", target_modules=modules,
                      target_parameters=params, modules_to_save=[ROUTER] if method.train_router else None,
                      task_type="CAUSAL_LM")


def _add_prefix(model, method, adapter_fp32: bool, task_type: str = "CAUSAL_LM"):
    from peft import PrefixTuningConfig, get_peft_model
    cfg = PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                             prefix_projection=method.prefix_projection)
    return get_peft_model(model, cfg)


def _train_all(model, method, adapter_fp32: bool, task_type: str = "CAUSAL_LM"):
    model.requires_grad_(True)
    _router_grad(model, method)
    return model


def _train_last_layers(model, method, adapter_fp32: bool, task_type: str = "CAUSAL_LM"):
    apply_freeze(model, method.trainable_layers)
    _router_grad(model, method)
    return model


def _router_grad(model, method) -> None:
    """Mixture-of-experts routers stay frozen unless method.train_router (full / freeze)."""
    from glmtune.models.moe import freeze_routers

    if not method.train_router:
        freeze_routers(model, train=False)
    elif freeze_routers(model, train=True) == 0:
        raise ConfigError("method.train_router applies to mixture-of-experts models; this one has no router",
                          field="method.train_router", fix="remove it")


@dataclass(frozen=True)
class MethodTraits:
    """What the rest of glmtune needs to know about a training method: one row per method, so no
    other module branches on the method's name."""

    name: str
    apply: Callable                 # (model, MethodSection, adapter_fp32, task_type) -> the model to train
    lora: bool = False              # has LoRA layers: speed.fused_lora, CUDA graphs, speed.adapter_dtype
    quantized: bool = False         # 4-bit nf4 base weights (bitsandbytes, CUDA), bf16 compute
    updates_base: bool = False      # trains base weights: fp32 master weights, saved as a whole model
    frozen_embeddings: bool = True  # gradient checkpointing then needs the input-grad hook
    # prefix tuning feeds trained key/value prefixes as a KV cache: packed rows need an empty one, and
    # compile / liger are not checked with it (their `auto` stays off)
    packs: bool = True
    kernels: bool = True


METHODS: dict[str, MethodTraits] = {t.name: t for t in (
    MethodTraits("lora", _add_lora, lora=True),
    MethodTraits("qlora", _add_lora, lora=True, quantized=True),
    MethodTraits("prefix", _add_prefix, packs=False, kernels=False),
    MethodTraits("full", _train_all, updates_base=True, frozen_embeddings=False),
    MethodTraits("freeze", _train_last_layers, updates_base=True),
)}


def method_traits(name: str) -> MethodTraits:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}", field="method.name", fix=f"use one of {', '.join(METHODS)}")
    return METHODS[name]


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit packed weights count as their logical size."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored uint8
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def memory_estimate_gib(total: int, trainable: int, *, weight_bytes: float, tokens_per_step: int,
                        hidden: int, layers: int, vocab: int, checkpointing: bool) -> dict:
    """Rough peak-memory estimate in GiB (before training, so users can size the batch).

    weights: total x bytes; trainable params carry an fp32 master-free AdamW state of 2 fp32 moments
    + the grad (in the weight dtype); activations ~ 34 bytes x hidden per token per layer in bf16
    (Korthikanti et al. 2022, eq. 1 without the attention-score term, which SDPA/flash never store),
    or one hidden vector per layer with checkpointing; logits: tokens x vocab x 4 bytes (fp32 upcast).
    """
    gib = 2 ** 30
    weights = total * weight_bytes
    optim = trainable * (8 + weight_bytes)
    per_tok_layer = (2 * hidden) if checkpointing else 34 * hidden
    acts = tokens_per_step * layers * per_tok_layer
    logits = tokens_per_step * vocab * 4 * 2  # logits + their grad
    return {k: round(v / gib, 2) for k, v in dict(weights=weights, optimizer=optim, activations=acts,
                                                  logits=logits, total=weights + optim + acts + logits).items()}
