"""Bad configs end in one ConfigError naming the key; every shipped preset validates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.errors import ConfigError
from glmtune.train.config import explain, load_config, save_resolved

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _raw(model_dir, **section_over):
    raw = {"model": {"path": str(model_dir), "dtype": "fp32"}, "data": {"datasets": ["x.jsonl"]},
           "output": {"dir": "runs/x"}}
    for k, v in section_over.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_validate(preset):
    cfg = load_config(CONFIGS / preset, check_paths=False)
    assert cfg.output.dir and cfg.method.name in ("lora", "qlora", "prefix", "full", "freeze")


def test_preset_set_is_complete():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert len(names) >= 5
    from glmtune.train.launch import ACCELERATE_DIR, ACCELERATE_PRESETS, accelerate_config_path
    # every preset ships; the DeepSpeed ones resolve only where deepspeed is installed (checked there)
    assert all((ACCELERATE_DIR / f"{name}.yaml").is_file() for name in ACCELERATE_PRESETS)
    assert accelerate_config_path("ddp").is_file() and accelerate_config_path("fsdp").is_file()


def test_unknown_key_is_named(tiny_model):
    with pytest.raises(ConfigError, match=r"field 'train.lr_rate': unknown key"):
        load_config(_raw(tiny_model, train={"lr_rate": 1}))
    with pytest.raises(ConfigError, match=r"field 'method.rank'"):
        load_config(_raw(tiny_model), ["method.rank=8"])


def test_wrong_type_is_named(tiny_model):
    with pytest.raises(ConfigError, match=r"field 'train.batch_size'.*'four'"):
        load_config(_raw(tiny_model, train={"batch_size": "four"}))
    with pytest.raises(ConfigError, match=r"field 'method.name'"):
        load_config(_raw(tiny_model), ["method.name=adapter"])


def test_overrides_are_typed(tiny_model):
    cfg = load_config(_raw(tiny_model), ["train.lr=3e-4", "data.packing=true", "method.target_modules=[q_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.data.packing is True and cfg.method.target_modules == ["q_proj"]


def test_missing_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'model.path'.*model not found"):
        load_config(_raw(tmp_path / "nope"))


def test_fp16_refused_for_glm(tiny_model):
    with pytest.raises(ConfigError, match=r"field 'model.dtype'.*NaN"):
        load_config(_raw(tiny_model, model={"dtype": "fp16"}))


def test_yaml_file_errors_name_the_file(tmp_path, tiny_model):
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(_raw(tiny_model, eval={"every": -1})))
    with pytest.raises(ConfigError, match=r"c.yaml: field 'eval.every'"):
        load_config(p)


def test_cutoff_shorter_than_system_prompt(tiny_model, tmp_path):
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.train.data import encode_records

    rec = {"messages": [{"role": "system", "content": "You classify intents. " * 20},
                        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    tok = load_tokenizer(tiny_model)
    with pytest.raises(ConfigError, match=r"field 'data.cutoff_len'.*system prompt"):
        encode_records([rec], tok, get_template("glm4"), cutoff_len=32)
    exs, stats = encode_records([rec], tok, get_template("glm4"), cutoff_len=512)
    assert stats["encoded"] == 1 and len(exs[0]) < 512


def test_resolved_config_and_explain(tiny_model, tmp_path):
    cfg = load_config(_raw(tiny_model))
    text = save_resolved(cfg, tmp_path).read_text()
    assert "warmup_ratio: 0.0" in text and load_config(__import__("yaml").safe_load(text)) == cfg
    assert "dropout: 0.0  # LoRA dropout" in explain()


def test_method_names_are_the_method_table():
    """The config's method names and glmtune.models.peft_setup.METHODS (the one table) agree."""
    from typing import get_args

    from glmtune.models.peft_setup import METHODS
    from glmtune.train.config import MethodSection
    assert set(get_args(MethodSection.model_fields["name"].annotation)) == set(METHODS)


def test_empty_datasets_is_a_config_error_naming_the_field(tiny_model):
    """`datasets: []` passed validation and failed after encoding ("no training examples left")."""
    with pytest.raises(ConfigError) as e:
        load_config(_raw(tiny_model, data={"datasets": []}))
    assert str(e.value) == ("field 'data.datasets': no training data (the list is empty). Fix: name at least one "
                            "dataset: a datasets.yaml name or a data file (JSONL/JSON/CSV)")
