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


def _truncated_copy(src, dest):
    """A model folder whose model.safetensors lost its second half (a copy or download cut short)."""
    import os
    import shutil
    shutil.copytree(src, dest)
    weights = dest / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return weights


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, glm4_tokenizer_dir, capsys):
    from glmtune.cli.main import main
    from glmtune.errors import InputError
    from glmtune.models.tiny import build_tiny_glm4

    good = build_tiny_glm4(tmp_path / "m", glm4_tokenizer_dir)
    check_model_dir(good)  # a whole file passes
    weights = _truncated_copy(good, tmp_path / "cut")
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "cut")
    assert str(e.value).startswith(f"{weights}: damaged weight file") and "download this file again" in str(e.value)
    # every command that loads the folder says the same, before loading anything (through the CLI's
    # entry point in this process: a subprocess per command would cost a torch import each)
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {{path: {tmp_path / 'cut'}}}\ndata: {{datasets: [nope.jsonl]}}\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    capsys.readouterr()
    for argv in (["train", str(config)], ["chat", "--model", str(tmp_path / "cut")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert f"{weights}: damaged weight file" in err
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_is_switched_on_by_the_installed_name(method):
    """transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    and warns on the old name; setup_method calls whichever the installed model has (5.17 has only
    the old one), so it works on both and never runs a deprecated spelling."""
    import warnings

    from transformers import Glm4Config, Glm4ForCausalLM

    from glmtune.models.peft_setup import setup_method
    from glmtune.train.config import MethodSection

    model = Glm4ForCausalLM(Glm4Config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, num_hidden_layers=2, vocab_size=64,
                                       pad_token_id=0))
    with warnings.catch_warnings():
        # only glmtune's own call: PEFT 0.21 itself still reads `is_gradient_checkpointing` (warns on 5.24)
        warnings.filterwarnings("error", message="`gradient_checkpointing_enable`", category=FutureWarning)
        trained = setup_method(model, MethodSection(name=method, target_modules=["q_proj"]),
                               gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and trained.is_gradient_checkpointing
