"""Every key an align command does not read is refused with one line naming it: `glmtune train`'s own
keys in any align config, and align: keys of other algorithms; the keys it does read reach TRL's
config (none dropped)."""
from __future__ import annotations

import pytest

from glmtune.align.config import (ALGORITHMS, TRAIN_ONLY, AlignSection, algorithms_of, check_for,
                                  load_align_config)
from glmtune.errors import ConfigError, GlmtuneError

SAMPLE = {"beta": 0.2, "loss_type": None, "packing": False, "pack_tokens": 512, "precompute_reference": True,
          "simpo_gamma": 1.0, "desirable_weight": 1.5, "undesirable_weight": 0.5, "kl_coef": 0.1,
          "num_generations": 2, "max_new_tokens": 8, "temperature": 0.7, "clip_range": 0.3, "ppo_epochs": 2,
          "rewards": [{"name": "label"}]}


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
                     "epsilon": 0.3, "num_iterations": 2},
            "ppo": {"beta": 0.1, "num_generations": 2, "epsilon": 0.3}}[algorithm]
    assert {k: getattr(args, k) for k in want} == want


def test_unknown_loss_type_is_a_config_error(tmp_path):
    from glmtune.align.trainers import ALGORITHMS as TABLE, training_arguments
    cfg = load_align_config(_raw(tmp_path, align={"loss_type": "sigmoidd"}), check_paths=False)
    with pytest.raises(ConfigError, match="field 'align.loss_type': dpo has no loss_type 'sigmoidd'.*sigmoid, hinge"):
        training_arguments(cfg, TABLE["dpo"], tmp_path / "o", has_dev=False, cuda=False)
    cfg = load_align_config(_raw(tmp_path, align={"loss_type": "ipo"}), check_paths=False)
    assert training_arguments(cfg, TABLE["dpo"], tmp_path / "o", has_dev=False, cuda=False).loss_type == ["ipo"]


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
    for key in ("simpo_gamma:", "desirable_weight:", "packing:", "precompute_reference:", "adapter:"):
        assert key in text
    for key in ("train_on:", "truncate_side:", "num_virtual_tokens:", "trainable_layers:", "profile_steps:"):
        assert key not in text, key
