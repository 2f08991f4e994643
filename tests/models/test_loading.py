"""Model loading never downloads and fails with what to do."""
from __future__ import annotations

import pytest
import torch

from glmtune.errors import ModelNotFoundError
from glmtune.models.loading import check_model_dir, load_model
from glmtune.models.peft_setup import LORA_TARGETS, lora_targets


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(ModelNotFoundError, match="the folder"):
        check_model_dir(tmp_path / "none")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="weight files"):
        check_model_dir(tmp_path)


def test_tiny_glm4_loads_in_requested_dtype_with_native_lora_targets(tmp_path, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4
    path = build_tiny_glm4(tmp_path / "m", glm4_tokenizer_dir)
    model = load_model(path, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert lora_targets(model, "auto") == LORA_TARGETS["glm4"]
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(LORA_TARGETS["glm4"]) <= names
