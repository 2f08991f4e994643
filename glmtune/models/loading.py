"""Load a causal LM and its tokenizer from a local folder. Never downloads."""
from __future__ import annotations

from pathlib import Path

from glmtune.errors import ModelNotFoundError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_dir(path: str | Path) -> Path:
    """Fail early, with what to do, when a model folder is missing or incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(path)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(path, "config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelNotFoundError(path, "the weight files (*.safetensors)")
    return path


def load_model(path: str | Path, *, dtype: str = "auto", attn_implementation: str | None = None,
               device_map=None, quantization_config=None, **kwargs):
    """AutoModelForCausalLM.from_pretrained with local_files_only and a clear missing-folder error."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                device_map=device_map,
                                                quantization_config=quantization_config, **extra, **kwargs)
