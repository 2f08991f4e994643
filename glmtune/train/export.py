"""`glmtune export`: merge a LoRA adapter into its base and write a plain transformers model folder.

The result (sharded safetensors + tokenizer + glmtune.json) loads with
`AutoModelForCausalLM.from_pretrained(out)` and is accepted as `--model` by every glmtune command.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from glmtune.errors import ConfigError, ModelNotFoundError


def _adapter_base(adapter: Path) -> str | None:
    from glmtune.models.folder import META_FILE, read_json, read_model_folder

    if (adapter / META_FILE).exists():
        return read_model_folder(adapter).meta.get("base_model")
    return read_json(adapter / "adapter_config.json").get("base_model_name_or_path")


def export_merged(base: str | Path | None, adapter: str | Path, out: str | Path, *, shard_size: str = "2GB",
                  dtype: str = "auto") -> Path:
    """Merge `adapter` into `base` (default: the base recorded in the adapter's glmtune.json) and save to `out`.

    A full/freeze checkpoint (already a model folder) is copied through the same save path, so the
    output layout is the same for every method. Prefix tuning cannot be merged (its prefixes are
    extra keys/values, not weight deltas) and is refused.
    """
    import torch
    from peft import PeftConfig, PeftModel

    from glmtune.models.loading import check_model_dir, check_safetensors_files, load_model
    from glmtune.models.folder import META_FILE, read_model_folder, write_glmtune_meta
    from glmtune.models.tokenizer import load_tokenizer

    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise ModelNotFoundError(adapter, "the adapter folder")
    is_peft = (adapter / "adapter_config.json").exists()
    base = Path(base) if base else (Path(b) if (b := _adapter_base(adapter)) else None)
    if is_peft and base is None:
        raise ConfigError("no base model given and none recorded in the adapter", field="--base",
                          fix="pass --base DIR")
    if is_peft:
        check_model_dir(base)
        check_safetensors_files(adapter)
        peft_type = str(PeftConfig.from_pretrained(str(adapter)).peft_type)
        if "LORA" not in peft_type.upper():
            raise ConfigError(f"a {peft_type} adapter cannot be merged into the weights", field="--adapter",
                              fix="serve it with the base model and the adapter instead")
        # merge in the stored dtype of the base (bf16 for GLM checkpoints); fp32 models stay fp32
        model = load_model(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    else:
        model = load_model(adapter, dtype=dtype)
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else base
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard_size, safe_serialization=True)
    load_tokenizer(tok_src).save_pretrained(tmp)
    meta_src = adapter if (adapter / META_FILE).exists() else base
    meta = read_model_folder(meta_src).meta if meta_src else {}
    kept = {k: meta[k] for k in ("template", "default_system") if k in meta}
    write_glmtune_meta(tmp, **kept, merged_from={"base": str(base) if base else None, "adapter": str(adapter)})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out
