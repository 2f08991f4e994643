"""The model a run trains, decided in one place for `glmtune train` and `glmtune align`: the weight
dtype, the base model load (quantized or not, causal LM or scalar-head classifier), the method
applied from `models.peft_setup.METHODS`, and what a trained folder carries next to the weights.

`cfg` is any config with train's `model` / `method` / `train` sections (TrainConfig, AlignConfig).
"""
from __future__ import annotations

from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def weights_dtype(cfg) -> str:
    """torch dtype name the weights are loaded in. full/freeze update the base weights: fp32 masters
    (AdamW on bf16 weights loses small updates); fp16 training = fp32 weights + autocast + loss
    scaling; otherwise the frozen base is stored in the config's dtype."""
    from glmtune.models.peft_setup import method_traits

    if method_traits(cfg.method.name).updates_base or cfg.model.dtype == "fp16":
        return "float32"
    return DTYPES[cfg.model.dtype]


def load_base(cfg, *, device_index: int = 0, sequence_classifier: bool = False):
    """The base model of a run, from cfg.model.path, in `weights_dtype(cfg)`; qlora loads 4-bit nf4 on
    device `device_index`. `sequence_classifier`: a one-logit scalar head instead of the LM head (reward
    models)."""
    import torch

    from glmtune.models.folder import read_model_folder
    from glmtune.models.loading import check_model_dir, load_model
    from glmtune.models.peft_setup import method_traits, qlora_quant_config

    quant = None
    if method_traits(cfg.method.name).quantized:
        quant = qlora_quant_config(moe=read_model_folder(cfg.model.path).routed_experts > 0)
    kw = dict(device_map={"": device_index} if quant else None, quantization_config=quant,
              trust_remote_code=cfg.model.trust_remote_code)
    if sequence_classifier:
        from transformers import AutoModelForSequenceClassification
        path = check_model_dir(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=getattr(torch, weights_dtype(cfg)), local_files_only=True, **extra, **kw)
    else:
        model = load_model(cfg.model.path, dtype=weights_dtype(cfg), attn_implementation=cfg.model.attn_implementation,
                           **kw)
    model.config.use_cache = False  # a KV cache would also disable transformers' packed-sequence detection
    return model


def apply_method(model, cfg, *, adapter_fp32: bool = True, task_type: str = "CAUSAL_LM"):
    """cfg.method on a loaded base (models.peft_setup.setup_method), with cfg.train's checkpointing."""
    from glmtune.models.peft_setup import setup_method

    return setup_method(model, cfg.method, gradient_checkpointing=cfg.train.gradient_checkpointing,
                        adapter_fp32=adapter_fp32, task_type=task_type)


def write_folder_extras(folder: str | Path, tokenizer, cfg, template_name: str, **meta) -> None:
    """Tokenizer files and glmtune.json (template, method, base model, + `meta`) next to trained
    weights, so Predictor / chat / serve / export read every trained folder the same way."""
    from glmtune.models.folder import write_glmtune_meta

    tokenizer.save_pretrained(folder)
    write_glmtune_meta(folder, template=template_name, method=cfg.method.name,
                       base_model=str(Path(cfg.model.path).resolve()), **meta)
