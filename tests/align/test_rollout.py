"""GRPO / RLOO rollouts through glmtune's generation engine (glmtune.align.rollout): the engine runs
the policy being trained (its LoRA read in place), its greedy completions are TRL's own transformers
generate's for the same model and adapter state, the run says it used the engine, and a model the
engine cannot run falls back to TRL's generate with the reason printed once."""
from __future__ import annotations

import io
import json
import re

import pytest

from glmtune.align import run_alignment

ENGINE_LINE = "rollouts: glmtune's generation engine on the policy being trained"


def _console():
    from rich.console import Console
    buf = io.StringIO()
    return Console(file=buf, width=400), buf


def _lora_b_norm(folder) -> float:
    from safetensors.torch import load_file
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return sum(float(w.abs().sum()) for k, w in weights.items() if "lora_B" in k)


def _rollout_cfg(align_cfg, align_data, out, **over):
    # random tiny model, lr high enough that 2 steps make the LoRA visibly non-zero
    return align_cfg([align_data["labels"]], out=out, **{
        "train.max_steps": 2, "train.batch_size": 8, "train.lr": 5e-2, "align.num_generations": 4,
        "align.max_new_tokens": 8, "align.rewards": [{"name": "length", "options": {"max_chars": 40}}], **over})


def _forbid_generate(monkeypatch):
    """transformers' generate raises: a run that silently fell back to it fails."""
    from transformers import GenerationMixin

    def refuse(*_, **__):
        raise AssertionError("transformers generate ran: the rollouts fell back")
    monkeypatch.setattr(GenerationMixin, "generate", refuse)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tiny_model, align_data):
    """`glmtune align grpo` and `ppo`, 2 steps each on the tiny model, rollouts through the engine
    (transformers generate forbidden); {algorithm: (AlignResult, printed log)}."""
    import copy

    runs = {}
    for algorithm in ("grpo", "ppo"):
        out = tmp_path_factory.mktemp(f"rollout-{algorithm}")
        raw = {"model": {"path": str(tiny_model), "dtype": "fp32"},
               "data": {"datasets": [str(align_data["labels"])], "cutoff_len": 64},
               "method": {"name": "lora", "r": 8, "alpha": 16},
               "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-2, "scheduler": "constant", "seed": 0},
               "output": {"dir": str(out), "plot": False, "tensorboard": False},
               "align": {"num_generations": 4, "max_new_tokens": 8, "rollouts": "engine",
                         "rewards": [{"name": "length", "options": {"max_chars": 40}}]}}
        console, buf = _console()
        with pytest.MonkeyPatch.context() as mp:
            _forbid_generate(mp)
            res = run_alignment(algorithm, copy.deepcopy(raw), console=console)
        runs[algorithm] = (res, buf.getvalue())
    return runs


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_engine_run_trains_logs_and_says_so(engine_runs, algorithm):
    res, log = engine_runs[algorithm]
    assert log.count(ENGINE_LINE) == 1, log
    assert "rollouts: generation engine: " in log and "slots x" in log  # the engine's summary, when it started
    assert "rollouts: decode steps run eagerly" in log  # CPU: no CUDA graphs, said once
    # fp32 model and adapters, no dropout: train's fused LoRA layers run the policy (rollouts included)
    fused = re.search(r"fused LoRA: (\d+) of (\d+) LoRA linears", log)
    assert fused and fused[1] == fused[2] and int(fused[1]) > 0, log
    assert res.trainer.glmtune_rollouts.requests == 2 * 8  # 2 steps x 8 completions, all from the engine
    logged = [r for r in res.metrics if "reward" in r]
    assert len(logged) == 2
    for r in logged:
        for key in ("loss", "reward", "rollout/seconds", "completions/mean_length"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
        assert 0 < r["rollout/seconds"] < 60
    assert _lora_b_norm(res.adapter_path) > 0  # LoRA B starts at zero: the adapter was trained
    meta = json.loads((res.adapter_path / "glmtune.json").read_text())
    assert meta["algorithm"] == algorithm
    # from a fresh LoRA the KL reference is the base (adapters off), not TRL's frozen "ref" copy
    policy = res.trainer.accelerator.unwrap_model(res.trainer.model)
    assert res.trainer.beta > 0 and list(policy.peft_config) == ["default"]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_greedy_engine_rollouts_equal_trl_generate(engine_runs, algorithm):
    """After training (LoRA non-zero), the engine's greedy completions are exactly TRL's own
    transformers-generate rollout's (its `_generate_single_turn`) for the same prompts; top_k 1
    sampling is greedy too (TRL's sampling settings reach the engine)."""
    import trl

    res, _ = engine_runs[algorithm]
    trainer = res.trainer
    assert _lora_b_norm(res.adapter_path) > 0
    prompts = [list(ids) for ids in trainer.glmtune_prompt_ids.values()][:6]
    base = {"grpo": trl.GRPOTrainer, "ppo": trl.RLOOTrainer}[algorithm]
    extra = (1,) if algorithm == "grpo" else ()   # GRPO's num_generations argument
    trainer.generation_config.do_sample = False
    trainer.generation_kwargs["do_sample"] = False
    try:
        trl_out = base._generate_single_turn(trainer, prompts, None, {}, *extra)
        engine_out = trainer._generate_single_turn(prompts, None, {}, *extra)
        if algorithm == "grpo":
            (trl_out, trl_logps), (engine_out, engine_logps) = trl_out, engine_out
            assert trl_logps is None and engine_logps is None
        trainer.generation_config.do_sample, trainer.generation_config.top_k = True, 1
        top1 = trainer._generate_single_turn(prompts, None, {}, *extra)
    finally:
        trainer.glmtune_rollouts.close()
    if algorithm == "grpo":
        top1 = top1[0]
    assert engine_out == trl_out
    assert top1 == trl_out
    assert all(1 <= len(c) <= 8 for c in engine_out) and len({tuple(c) for c in engine_out}) > 1


def test_sampling_options_the_engine_cannot_run_are_errors():
    from transformers import GenerationConfig

    from glmtune.align.rollout import Sampling, sampling_of
    from glmtune.errors import GlmtuneError

    g = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                         repetition_penalty=1.1, eos_token_id=[1, 2], pad_token_id=0, disable_compile=True)
    assert sampling_of(g) == Sampling(5, 0.7, 0.9, 20, 1.1)
    g.do_sample = False
    assert sampling_of(g).temperature == 0.0
    for option, value in (("min_p", 0.1), ("no_repeat_ngram_size", 3)):
        bad = GenerationConfig(max_new_tokens=5, do_sample=True, **{option: value})
        with pytest.raises(GlmtuneError, match=rf"cannot run the rollout option\(s\) {option}.*align.rollouts: generate"):
            sampling_of(bad)


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory):
    """A tiny Qwen2-shaped model with sliding-window attention (the engine cannot run it), with the
    GLM-4 tokenizer and template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tiny import BUILTIN_GLM4_TOKENIZER
    from glmtune.models.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("sliding") / "qwen2"
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151552, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=32, max_window_layers=0,
                         tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    load_tokenizer(BUILTIN_GLM4_TOKENIZER).save_pretrained(out)
    write_glmtune_meta(out, template="glm4")
    return out


def test_fallback_says_why_once_and_engine_choice_refuses(align_cfg, align_data, sliding_model, tmp_path):
    from glmtune.errors import ConfigError

    console, buf = _console()
    res = run_alignment("grpo", _rollout_cfg(align_cfg, align_data, "fallback", model=sliding_model), console=console)
    log = buf.getvalue()
    why = "grpo rollouts: transformers generate (glmtune's generation engine cannot run them: it has layers " \
          "that are not full attention"
    assert log.count(why) == 1 and log.count("rollouts") == 1, log
    assert res.trainer.glmtune_rollouts is None and res.steps == 2
    assert all(r["rollout/seconds"] > 0 for r in res.metrics if "reward" in r)
    with pytest.raises(ConfigError, match=r"field 'align.rollouts': align.rollouts is engine, but glmtune's "
                                          r"generation engine cannot run this model: it has layers"):
        run_alignment("grpo", _rollout_cfg(align_cfg, align_data, "refused", model=sliding_model,
                                           **{"align.rollouts": "engine"}))
    assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_generate_choice_runs_trl_generate(align_cfg, align_data, tmp_path):
    console, buf = _console()
    cfg = _rollout_cfg(align_cfg, align_data, "generate", **{"train.max_steps": 1, "align.rollouts": "generate"})
    res = run_alignment("grpo", cfg, console=console)
    assert "grpo rollouts: transformers generate (align.rollouts: generate)" in buf.getvalue()
    assert res.trainer.glmtune_rollouts is None and res.steps == 1


def test_plan_sizes_the_engine_and_refuses_other_ranks(tiny_model):
    """One generation batch of slots (TRL: per-device batch x steps_per_generation, or the eval batch),
    the longest prompt + max_completion_length of positions; a rank past 0 of a multi-GPU run falls
    back (not tested on several GPUs yet), or fails with align.rollouts: engine."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from glmtune.align.rollout import plan_rollouts
    from glmtune.errors import ConfigError
    from glmtune.models.loading import load_model

    model = get_peft_model(load_model(str(tiny_model), dtype="float32"), LoraConfig(r=4, target_modules=["q_proj"]))
    args = SimpleNamespace(per_device_train_batch_size=8, steps_per_generation=2, per_device_eval_batch_size=4,
                           max_completion_length=16)
    rollouts, note = plan_rollouts("auto", model, args, [10, 30, 7], "ppo", print)
    assert (rollouts.slots, rollouts.positions) == (16, 46) and rollouts.engine is None  # started at first use
    assert note.startswith("ppo rollouts: glmtune's generation engine") and "16 completions at once" in note
    args.per_device_eval_batch_size = 32
    assert plan_rollouts("engine", model, args, [10], "grpo", print)[0].slots == 32
    rollouts, note = plan_rollouts("auto", model, args, [10], "grpo", print, local_rank=1)
    assert rollouts is None and note == ("grpo rollouts: transformers generate (glmtune's generation engine cannot run "
                                         "them: on rank 1 of a multi-GPU run: engine rollouts on several GPUs are not "
                                         "tested yet, only rank 0 uses the engine)")
    with pytest.raises(ConfigError, match="field 'align.rollouts'.*on rank 2"):
        plan_rollouts("engine", model, args, [10], "grpo", print, local_rank=2)
