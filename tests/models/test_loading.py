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


def test_find_decoder_reads_every_layout():
    """One function finds the blocks for method freeze, compile and CUDA graphs: through a PEFT
    wrapper, in the transformers-native layout and in remote-code ChatGLM's."""
    from peft import LoraConfig, get_peft_model
    from transformers import Glm4Config, Glm4ForCausalLM

    from glmtune.errors import GlmtuneError
    from glmtune.models.loading import find_decoder

    native = Glm4ForCausalLM(Glm4Config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, num_hidden_layers=3, vocab_size=64,
                                        pad_token_id=0))
    dec = find_decoder(native)
    assert dec.lm is native and dec.body is native.model and dec.layers is native.model.layers and len(dec.layers) == 3
    wrapped = get_peft_model(native, LoraConfig(r=2, target_modules=["q_proj"]))
    assert find_decoder(wrapped).layers is native.model.layers and find_decoder(wrapped).lm is native

    chatglm = torch.nn.Module()  # remote-code ChatGLM2/3 / glm-4-9b-chat: transformer.encoder.layers
    chatglm.transformer = torch.nn.Module()
    chatglm.transformer.encoder = torch.nn.Module()
    chatglm.transformer.encoder.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
    assert find_decoder(chatglm).layers is chatglm.transformer.encoder.layers
    with pytest.raises(GlmtuneError, match="cannot find the transformer blocks of Linear"):
        find_decoder(torch.nn.Linear(2, 2))
