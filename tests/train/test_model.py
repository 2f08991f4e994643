"""train.model: the one home of the weight dtype, the base load and a trained folder's extras, which
`glmtune train` and `glmtune align` both call."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from glmtune.train.model import weights_dtype, write_folder_extras


def _cfg(method: str, dtype: str, path: str = "m"):
    return SimpleNamespace(method=SimpleNamespace(name=method), model=SimpleNamespace(dtype=dtype, path=path))


@pytest.mark.parametrize("method, dtype, want", [
    ("lora", "bf16", "bfloat16"), ("qlora", "bf16", "bfloat16"), ("prefix", "fp32", "float32"),
    ("lora", "fp16", "float32"),     # fp16 training: fp32 weights + autocast + loss scaling
    ("full", "bf16", "float32"), ("freeze", "bf16", "float32"),  # fp32 masters for updated base weights
])
def test_weights_dtype(method, dtype, want):
    assert weights_dtype(_cfg(method, dtype)) == want


def test_folder_extras_are_trains_glmtune_json(tmp_path, glm4_tokenizer_dir):
    from glmtune.models.tokenizer import load_tokenizer
    folder = tmp_path / "final"
    folder.mkdir()
    write_folder_extras(folder, load_tokenizer(glm4_tokenizer_dir), _cfg("lora", "bf16", str(tmp_path)), "glm4",
                        algorithm="dpo")
    meta = json.loads((folder / "glmtune.json").read_text())
    assert meta == {"template": "glm4", "method": "lora", "base_model": str(tmp_path.resolve()), "algorithm": "dpo"}
    assert (folder / "tokenizer_config.json").exists()
