"""Alignment data formats and bad input: one-line errors naming file:line or the YAML key, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from glmtune.align.config import load_align_config
from glmtune.data.readers import read_records
from glmtune.errors import ConfigError, InputError
from toy_task import toy_prompts, write_jsonl


def test_preference_formats_read_to_canonical(tmp_path):
    rows = [{"prompt": "hi", "chosen": "good", "rejected": "bad"},
            {"messages": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": {"from": "gpt", "value": "b"}},
            {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]},
            {"instruction": "do", "input": "x", "chosen": "y", "rejected": "z"}]
    recs = read_records(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(r["messages"][-1]["content"], r["chosen"], r["rejected"]) for r in recs] == [
        ("hi", "good", "bad"), ("q", "a", "b"), ("q", "a", "c"), ("do\nx", "y", "z")]
    kit = read_records(write_jsonl(tmp_path / "k.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}], "gold_answers": ["g1", "g2"], "bad_answers": ["b"]}]))
    assert kit[0]["messages"] == [{"role": "user", "content": "q"}]
    assert kit[0]["references"] == ["g1", "g2"] and kit[0]["bad_answers"] == ["b"]


def test_data_convert_keeps_pairs(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "good", "rejected": "bad"}])
    out = tmp_path / "c.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "glmtune", "data", "convert", str(src), "--out", str(out)],
                   check=True, env=env, capture_output=True)
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["chosen"] == "good" and rec["rejected"] == "bad"
    assert read_records(out)[0]["chosen"] == "good"  # converted output reads back as pairs


@pytest.mark.parametrize("row, line_field", [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "field 'rejected': chosen and rejected are identical"),
    ({"prompt": "hi", "chosen": "good"}, "field 'rejected': missing field 'rejected'"),
    ({"conversations": [{"from": "human", "value": "q"}], "gold_answers": []}, "field 'gold_answers': empty gold"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, line_field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row]
                       if "chosen" in row else [row, row])
    with pytest.raises(InputError) as e:
        read_records(path)
    msg = str(e.value)
    assert f"{path}:{2 if 'chosen' in row else 1}:" in msg and line_field in msg and "\n" not in msg


def test_pair_answers_are_what_the_model_writes(glm4_tokenizer_dir):
    """DPO's chosen/rejected ids are the template's answer ids (the ones evaluation scores labels by): they
    end at the end-of-turn token, without ChatML's newline after <|im_end|> that no model generates."""
    from glmtune.align.data import preference_rows, reward_model_rows
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    tok = load_tokenizer(glm4_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    recs = [{"messages": [{"role": "user", "content": "红色的水果？"}], "chosen": "苹果", "rejected": "河流"}]
    kw = dict(cutoff_len=64, on_overflow="error")
    row, = preference_rows(recs, get_template("qwen"), tok, **kw)
    assert (tok.decode(row["chosen_ids"]), tok.decode(row["rejected_ids"])) == ("苹果<|im_end|>", "河流<|im_end|>")
    rm, = reward_model_rows(recs, get_template("qwen"), tok, **kw)
    assert tok.decode(rm["chosen_ids"]).endswith("<|im_start|>assistant\n苹果<|im_end|>")


def _cfg(tiny_model, tmp_path, **align) -> dict:
    return {"model": {"path": str(tiny_model), "dtype": "fp32"}, "data": {"datasets": ["x.jsonl"]},
            "output": {"dir": str(tmp_path / "out")}, "align": align}


def test_config_errors_name_the_key(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="field 'align.betta': unknown key.*glmtune align --explain"):
        load_align_config(_cfg(tiny_model, tmp_path, betta=0.1))
    with pytest.raises(ConfigError, match="field 'align.beta'"):
        load_align_config(_cfg(tiny_model, tmp_path, beta=-1))
    with pytest.raises(ConfigError, match="method.name=prefix is not supported"):
        load_align_config({**_cfg(tiny_model, tmp_path), "method": {"name": "prefix"}})
    profiled = _cfg(tiny_model, tmp_path)
    profiled["output"]["profile_steps"] = 2  # a train-only key: refused, never silently ignored
    with pytest.raises(ConfigError, match="output.profile_steps profiles `glmtune train`"):
        load_align_config(profiled)


def test_data_names_come_from_data_registry(tiny_model, tmp_path):
    """align reads data as `glmtune train` does (glmtune.data.registry.load_dataset): a name is looked up in
    data.registry, and prompt-only records (grpo/ppo) need no assistant turn."""
    from glmtune.align.run import load_splits
    prompts = toy_prompts(6, 0)
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": p}], "label": k}
                                             for p, k in prompts])
    registry = tmp_path / "my_datasets.yaml"
    registry.write_text("toy_prompts:\n  file: prompts.jsonl\n", encoding="utf-8")
    raw = _cfg(tiny_model, tmp_path)
    raw["data"] = {"datasets": ["toy_prompts"], "dev": "toy_prompts", "registry": str(registry)}
    train, dev = load_splits(load_align_config(raw))
    assert [(r["messages"][-1]["content"], r["label"]) for r in train] == prompts
    assert [r["meta"]["line"] for r in dev] == [1, 2, 3, 4, 5, 6]


def test_bad_reward_and_missing_data_write_nothing(tiny_model, align_data, tmp_path):
    from glmtune.align import run_alignment
    cfg = _cfg(tiny_model, tmp_path, rewards=[{"name": "label"}, {"name": "no_such_reward"}])
    cfg["data"]["datasets"] = [str(align_data["labels"])]
    cfg["train"] = {"batch_size": 4}
    with pytest.raises(ConfigError, match="field 'align.rewards.1.name': unknown reward 'no_such_reward'"):
        run_alignment("grpo", cfg)
    cfg["align"]["rewards"] = [{"name": "label"}]
    cfg["data"]["datasets"] = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(InputError, match="missing.jsonl"):
        run_alignment("grpo", cfg)
    cfg["align"]["rewards"] = []
    with pytest.raises(ConfigError, match="field 'align.rewards': grpo needs at least one reward"):
        run_alignment("grpo", cfg)
    cfg["data"]["datasets"], cfg["align"]["rewards"], cfg["train"]["batch_size"] = \
        [str(align_data["labels"])], [{"name": "label"}], 6
    with pytest.raises(ConfigError, match="field 'train.batch_size'.*multiple of align.num_generations"):
        run_alignment("grpo", cfg)
    assert not (tmp_path / "out").exists()


def test_cli_one_line_error_and_explain(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model}}}\ndata: {{datasets: [x.jsonl]}}\noutput: {{dir: {tmp_path / 'o'}}}\n"
                   "align: {rewards: [{name: nope}]}\n")
    r = subprocess.run([sys.executable, "-m", "glmtune", "align", "grpo", str(cfg)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "x.jsonl" in r.stderr  # data is checked first: the missing file
    r = subprocess.run([sys.executable, "-m", "glmtune", "align", "--explain"], capture_output=True, text=True,
                       env=env, check=True)
    for key in ("adapter:", "beta:", "num_generations:", "kl_coef:", "clip_range:", "ppo_epochs:", "rewards:"):
        assert key in r.stdout


@pytest.mark.parametrize("preset", sorted(p.name for p in (
    __import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "align").glob("*.yaml")))
def test_shipped_align_presets_validate(preset):
    """Each preset loads and is what the algorithm its name starts with (dpo_..., kto_...) reads."""
    from pathlib import Path

    from glmtune.align.config import check_for
    path = Path(__file__).resolve().parents[2] / "configs" / "align" / preset
    check_for(load_align_config(path, check_paths=False), preset.split("_")[0], str(path))
