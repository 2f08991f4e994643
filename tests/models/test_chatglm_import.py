"""`glmtune model import-chatglm`: remote-code ChatGLM2 / ChatGLM3 / glm-4-9b-chat checkpoints become
native GlmForCausalLM folders, and the native logits equal ChatGLM's block computed here, in the
test, straight from the source tensors. Then the pipeline runs on the imported folders, and a
remote-code folder given to a command is refused with one line naming the import.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from chatglm_reference import chatglm_reference_logits, read_source_tensors
from glmtune.cli.model import template_stop_ids
from glmtune.models.tiny_chatglm import TINY_CHATGLM, write_chatglm_checkpoint

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "serve"))
from live_server import served  # noqa: E402

FAMILIES = ("chatglm2", "chatglm3", "glm4")
MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "请用一句话介绍一下长城，以及它为什么有名？"},
            {"role": "assistant", "content": "长城是中国古代的防御工程。"},
            {"role": "user", "content": "Thanks! And the Forbidden City?"}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, request):
    """family -> (source folder, imported fp32 folder, ImportReport), built once for the module."""
    from glmtune.models.chatglm_import import import_chatglm

    root = tmp_path_factory.mktemp("chatglm")
    out = {}
    for seed, family in enumerate(FAMILIES):
        src = write_chatglm_checkpoint(root / f"{family}-src", family, request.getfixturevalue(f"{family}_tokenizer_dir"),
                                       overrides=TINY_CHATGLM, seed=seed)
        report = import_chatglm(src, root / family, dtype="fp32", stop_ids_for=template_stop_ids)
        out[family] = (src, report.out_dir, report)
    return out


def prompt_ids(family: str, folder: Path) -> list[int]:
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    return get_template(family).encode_prompt(load_tokenizer(folder), MESSAGES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_source_tensor_used_once_and_config_mapped(imported, family):
    from safetensors import safe_open

    src, out, report = imported[family]
    source = read_source_tensors(src)
    assert set(report.used) == set(source)  # no source tensor skipped or invented
    made = [n for names in report.used.values() for n in names]
    assert len(made) == len(set(made))  # no native tensor made twice
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(made)
    assert report.used["transformer.rotary_pos_emb.inv_freq"] == []  # a buffer: checked, not stored
    assert report.used["transformer.encoder.layers.1.self_attention.query_key_value.bias"] == [
        f"model.layers.1.self_attn.{p}_proj.bias" for p in "qkv"]

    src_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"] and "auto_map" not in cfg
    assert cfg["num_key_value_heads"] == src_cfg["multi_query_group_num"] == 2
    assert cfg["head_dim"] == src_cfg["kv_channels"] == 32 and cfg["vocab_size"] == src_cfg["padded_vocab_size"]
    assert cfg["rms_norm_eps"] == src_cfg["layernorm_epsilon"] and cfg["attention_bias"] is True
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0 * src_cfg.get("rope_ratio", 1)
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert json.loads((out / "glmtune.json").read_text())["template"] == family
    assert not list(out.glob("*.py"))


@pytest.mark.parametrize("family", FAMILIES)
def test_native_logits_equal_the_chatglm_block(imported, family):
    from transformers import AutoModelForCausalLM

    src, out, _ = imported[family]
    ids = prompt_ids(family, out)
    assert len(ids) >= 30
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        native = model(input_ids=torch.tensor([ids])).logits[0]
    reference = chatglm_reference_logits(read_source_tensors(src), json.loads((src / "config.json").read_text()), ids)
    assert native.shape == reference.shape
    assert (native - reference).abs().max().item() < 1e-5
    assert reference.std() > 0.1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("family", FAMILIES)
def test_template_renders_and_stop_ids_end_generation(imported, family):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    src, out, report = imported[family]
    tpl = get_template(**read_model_folder(out).template_args())
    tok = load_tokenizer(out)
    assert tpl.name == family
    # the imported tokenizer gives the ids the source tokenizer (converted as glmtune always does) gives
    assert tpl.encode(tok, MESSAGES[:3]).input_ids == tpl.encode(load_tokenizer(src, family=family),
                                                                   MESSAGES[:3]).input_ids
    stops = get_template(family).stop_token_ids(tok)
    assert report.stop_ids == stops and len(stops) == (1 if family == "chatglm2" else 3)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == stops and json.loads((out / "config.json").read_text())["eos_token_id"] == stops

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([prompt_ids(family, out)])
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    head = model.lm_head.weight.data
    for stop in stops:  # swap the LM-head rows: the first greedy token becomes `stop`
        head[[first, stop]] = head[[stop, first]]
        new = model.generate(ids, generation_config=gen, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:]
        head[[first, stop]] = head[[stop, first]]
        assert new.tolist() == [stop]


def test_cli_import_bf16_and_input_errors(imported, tmp_path):
    from safetensors import safe_open
    from typer.testing import CliRunner

    from glmtune.cli.main import app, register_commands
    from glmtune.errors import InputError
    from glmtune.models.chatglm_import import import_chatglm

    register_commands()
    src = imported["chatglm3"][0]
    res = CliRunner().invoke(app, ["model", "import-chatglm", str(src), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "m" / "glmtune.json").read_text())["template"] == "chatglm3"

    with pytest.raises(InputError, match="output folder is not empty"):
        import_chatglm(src, tmp_path / "m")
    with pytest.raises(InputError, match="--template"):
        import_chatglm(src, tmp_path / "x", template="llama3")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        if f.suffix != ".bin" and f.name != "pytorch_model.bin.index.json":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(InputError, match="model-00002-of-00004.safetensors listed in model.safetensors.index.json"):
        import_chatglm(broken, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_remote_code_folder_is_refused_in_one_line(imported, tmp_path, capsys):
    from glmtune import Predictor
    from glmtune.cli.main import main
    from glmtune.errors import GlmtuneError
    from glmtune.models.loading import check_model_dir

    src = imported["glm4"][0]
    with pytest.raises(GlmtuneError, match="glmtune model import-chatglm"):
        Predictor(src)
    assert check_model_dir(src, trust_remote_code=True) == src  # explicitly trusted: the folder passes
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": MESSAGES[:3]}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {{path: {src}, dtype: fp32}}\ndata: {{datasets: [{data}]}}\n"
                   f"output: {{dir: {tmp_path / 'run'}}}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "remote-code ChatGLM" in err and f"glmtune model import-chatglm {src}" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the pipeline on imported folders


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _train_config(tmp_path: Path, model: Path, data: Path, method: str) -> Path:
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(json.dumps({
        "model": {"path": str(model), "dtype": "fp32"}, "data": {"datasets": [str(data)], "cutoff_len": 96},
        "method": {"name": method, **({"r": 4, "alpha": 8} if method == "lora" else {"num_virtual_tokens": 4})},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "seed": 0},
        "output": {"dir": str(tmp_path / f"run-{method}"), "plot": False, "tensorboard": False}}))
    return cfg


def test_train_lora_and_prefix_then_eval_classify(imported, tmp_path):
    """`glmtune train` (lora on the ChatGLM3 import, prefix on the ChatGLM2 import) and
    `glmtune eval classify` on the glm-4-9b-chat import, through the CLI's entry point (in this
    process: each subprocess would cost a torch import)."""
    from glmtune.cli.main import main

    qa = [{"messages": [{"role": "user", "content": f"第{i}个问题是什么？"},
                        {"role": "assistant", "content": f"答案{i}"}]} for i in range(4)]
    data = _write_jsonl(tmp_path / "qa.jsonl", qa)
    for family, method in (("chatglm3", "lora"), ("chatglm2", "prefix")):
        main(["train", str(_train_config(tmp_path, imported[family][1], data, method))])
        final = tmp_path / f"run-{method}" / "final"
        assert (final / "adapter_config.json").exists()
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == (
            "LORA" if method == "lora" else "PREFIX_TUNING")

    labels = ["开通", "取消", "投诉"]
    records = [{"messages": [{"role": "user", "content": f"客户说：{text}"},
                             {"role": "assistant", "content": label}], "label": label}
               for label in labels for text in ("我想办业务", "不要了")]
    cls = _write_jsonl(tmp_path / "cls.jsonl", records)
    main(["eval", "classify", "--model", str(imported["glm4"][1]), "--data", str(cls), "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_samples"] == len(records) and metrics["invalid_count"] == 0
    assert set(metrics["labels"]) == set(labels)


def test_chat_and_serve_answer_like_predictor(imported):
    """`glmtune chat` and `glmtune serve` on imported folders, through the CLI's commands in this
    process (the terminal and the server process are tests/infer/test_chat_cli.py's and
    tests/serve/test_serve_cli.py's; each subprocess here would cost a torch import)."""
    import openai
    from typer.testing import CliRunner

    from glmtune import Predictor
    from glmtune.cli.main import app, register_commands

    register_commands()
    glm4_dir, chatglm2_dir = imported["glm4"][1], imported["chatglm2"][1]
    question = "你好，请介绍一下你自己。"
    res = CliRunner().invoke(app, ["chat", "--model", str(glm4_dir), "--max-new-tokens", "6"],
                             input=f"{question}\n/exit\n")
    assert res.exit_code == 0, res.output
    # the chat prints "you> " when it reads, "glm> " before the streamed answer and a newline after it
    after_question = res.output.split("you> ", 2)
    assert len(after_question) == 3 and after_question[1].startswith("glm> "), res.output
    answer = after_question[1][len("glm> "):].removesuffix("\n")
    assert answer == Predictor(glm4_dir, max_new_tokens=6)(question)

    with served("--model", chatglm2_dir, "--max-tokens", "6", env={"GLMTUNE_API_KEY": "k"}) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="k", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):  # the key from the environment is required
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="other", max_retries=0).models.list()
        reply = client.chat.completions.create(model=chatglm2_dir.name, messages=[
            {"role": "user", "content": question}]).choices[0].message.content
    assert reply == Predictor(chatglm2_dir, max_new_tokens=6)(question)
