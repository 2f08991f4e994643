"""Every key an align command does not read is refused with one line naming it: `glmtune train`'s own
keys in any align config, and align: keys of other algorithms; the keys it does read reach TRL's
config (none dropped)."""
from __future__ import annotations

import pytest

from glmtune.align.config import (ALGORITHMS, TRAIN_ONLY, AlignSection, algorithms_of, check_for,
                                  load_align_config)
from glmtune.errors import ConfigError, GlmtuneError

SAMPLE = {"beta": 0.2, "loss_type": None, "packing": False, "pack_attention": "mask", "pack_tokens": 512,
          "adapter_dtype": "model", "precompute_reference": True, "simpo_gamma": 1.0, "desirable_weight": 1.5,
          "undesirable_weight": 0.5, "kl_coef": 0.1, "num_generations": 2, "max_new_tokens": 8,
          "temperature": 0.7, "clip_range": 0.3, "ppo_epochs": 2, "importance_sampling": "sequence",
          "rollouts": "generate", "rewards": [{"name": "label"}]}


def _raw(tmp_path, **sections) -> dict:
    raw = {"model": {"path": "unused"}, "data": {"datasets": ["x.jsonl"]}, "output": {"dir": str(tmp_path / "o")}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.mark.parametrize("key", sorted(TRAIN_ONLY))
def test_train_only_keys_are_refused_by_name(tmp_path, key):
    section, _, leaf = key.partition(".")
    raw = _raw(tmp_path, **{section: {leaf: "auto"} if leaf else {"liger": "none"}})
    with pytest.raises(ConfigError) as e:
        load_align_config(raw, check_paths=False)
    msg = str(e.value)
    assert f"field '{key}': {key} " in msg and "Fix: remove it" in msg and "\n" not in msg


def test_every_sample_key_is_an_align_key():
    assert set(SAMPLE) == set(AlignSection.model_fields)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_align_keys_of_other_algorithms_are_refused(tmp_path, algorithm):
    """For each algorithm: each align key it reads passes; each one it does not read fails naming it."""
    for key, value in SAMPLE.items():
        cfg = load_align_config(_raw(tmp_path, align={key: value, **(
            {"rewards": SAMPLE["rewards"]} if algorithm in ("grpo", "ppo") else {})}), check_paths=False)
        if algorithm in algorithms_of(key):
            check_for(cfg, algorithm)
        else:
            with pytest.raises(ConfigError, match=rf"field 'align.{key}': `glmtune align {algorithm}` does not "
                                                  rf"use align.{key} \(a key of "):
                check_for(cfg, algorithm)
    check_for(load_align_config(_raw(tmp_path, align={"rewards": SAMPLE["rewards"]}) if algorithm in ("grpo", "ppo")
                                else _raw(tmp_path), check_paths=False), algorithm)  # defaults only: fine


def test_every_key_has_a_reader():
    for key in AlignSection.model_fields:
        assert set(algorithms_of(key)) <= set(ALGORITHMS) and algorithms_of(key), key


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_options_reach_trl_config(tmp_path, algorithm):
    """Each algorithm's TRL config is built from glmtune's keys; the mapped values are TRL's fields."""
    from glmtune.align.trainers import ALGORITHMS as TABLE, training_arguments
    align = {k: SAMPLE[k] for k in SAMPLE if algorithm in algorithms_of(k) and k != "loss_type"}
    cfg = load_align_config(_raw(tmp_path, align=align, train={"batch_size": 4}, data={"cutoff_len": 300}),
                            check_paths=False)
    args = training_arguments(cfg, TABLE[algorithm], tmp_path / "o", has_dev=False, cuda=False)
    assert args.per_device_train_batch_size == 4
    want = {"rm": {"max_length": 300},
            "dpo": {"beta": 0.2, "max_length": 300, "precompute_ref_log_probs": True},
            "kto": {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.5},
            "orpo": {"beta": 0.2, "max_length": 300},
            "simpo": {"beta": 0.2, "loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 0.0},
            "grpo": {"beta": 0.1, "num_generations": 2, "max_completion_length": 8, "temperature": 0.7,
                     "epsilon": 0.3, "num_iterations": 2, "importance_sampling_level": "sequence"},
            "ppo": {"beta": 0.1, "num_generations": 2, "epsilon": 0.3}}[algorithm]
    assert {k: getattr(args, k) for k in want} == want


def test_unknown_loss_type_is_a_config_error(tmp_path):
    from glmtune.align.trainers import ALGORITHMS as TABLE, training_arguments
    cfg = load_align_config(_raw(tmp_path, align={"loss_type": "sigmoidd"}), check_paths=False)
    with pytest.raises(ConfigError, match="field 'align.loss_type': dpo has no loss_type 'sigmoidd'.*sigmoid, hinge"):
        training_arguments(cfg, TABLE["dpo"], tmp_path / "o", has_dev=False, cuda=False)
    cfg = load_align_config(_raw(tmp_path, align={"loss_type": "ipo"}), check_paths=False)
    assert training_arguments(cfg, TABLE["dpo"], tmp_path / "o", has_dev=False, cuda=False).loss_type == ["ipo"]


def _grpo_args(tmp_path, **align):
    from glmtune.align.trainers import ALGORITHMS as TABLE, training_arguments
    cfg = load_align_config(_raw(tmp_path, align={"rewards": SAMPLE["rewards"], **align}), check_paths=False)
    check_for(cfg, "grpo")
    return training_arguments(cfg, TABLE["grpo"], tmp_path / "o", has_dev=False, cuda=False)


@pytest.mark.parametrize("given, loss, level", [
    ({}, "dapo", "token"),                                     # TRL's defaults
    ({"loss_type": "dr_grpo"}, "dr_grpo", "token"),
    ({"loss_type": "grpo", "importance_sampling": "sequence"}, "grpo", "sequence"),
    ({"loss_type": "gspo"}, "grpo", "sequence"),               # GSPO: grpo loss, sequence-level ratios
    ({"loss_type": "luspo"}, "luspo", "sequence"),             # TRL: luspo needs sequence-level ratios
    ({"loss_type": "cispo"}, "cispo", "token"),
])
def test_grpo_loss_types_reach_trl(tmp_path, given, loss, level):
    args = _grpo_args(tmp_path, **given)
    assert (args.loss_type, args.importance_sampling_level) == (loss, level)


def test_grpo_unknown_loss_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'align.loss_type': grpo has no loss_type 'gpso'\. Fix: use one "
                                          r"of grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo, gspo"):
        _grpo_args(tmp_path, loss_type="gpso")
    with pytest.raises(ConfigError, match=r"field 'align.importance_sampling': loss_type gspo uses sequence-level "
                                          r"importance ratios, not token"):
        _grpo_args(tmp_path, loss_type="gspo", importance_sampling="token")
    with pytest.raises(ConfigError, match=r"field 'align.importance_sampling': Input should be 'token' or 'sequence'"):
        load_align_config(_raw(tmp_path, align={"importance_sampling": "group"}), check_paths=False)


def test_grpo_loss_names_are_trls():
    """Every loss glmtune offers is one TRL's GRPOConfig documents (a TRL upgrade that drops one fails here)."""
    import dataclasses

    import trl

    from glmtune.align.trainers import GRPO_LOSSES, GRPO_RECIPES
    doc = next(f for f in dataclasses.fields(trl.GRPOConfig) if f.name == "loss_type").metadata["help"]
    for name in GRPO_LOSSES + tuple(loss for loss, _ in GRPO_RECIPES.values()):
        assert f"'{name}'" in doc, name


def test_an_option_trl_lacks_is_an_error_not_dropped(tmp_path, monkeypatch):
    import dataclasses

    from glmtune.align import trainers
    algo = dataclasses.replace(trainers.ALGORITHMS["orpo"], options=lambda cfg: {"no_such_option": 1})
    cfg = load_align_config(_raw(tmp_path), check_paths=False)
    with pytest.raises(GlmtuneError, match="ORPOConfig has no option no_such_option"):
        trainers.training_arguments(cfg, algo, tmp_path / "o", has_dev=False, cuda=False)


def test_explain_lists_align_keys_and_no_train_only_key():
    from glmtune.align.config import AlignConfig
    from glmtune.train.config import explain
    text = explain(AlignConfig)
    for key in ("simpo_gamma:", "desirable_weight:", "packing:", "pack_attention:", "precompute_reference:",
                "adapter:"):
        assert key in text
    for key in ("train_on:", "truncate_side:", "num_virtual_tokens:", "trainable_layers:", "profile_steps:"):
        assert key not in text, key
