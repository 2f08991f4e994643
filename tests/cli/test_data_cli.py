"""`glmtune data` end to end on a CMCC-shaped CSV written here: convert -> clean -> split -> stats -> render."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import glmtune.cli.data  # noqa: F401  (registers the `data` group)
from glmtune.cli.main import app
from glmtune.data.cmcc import CMCC_INTENTS
from glmtune.errors import InputError

runner = CliRunner()


def write_cmcc(path: Path, per_label: int = 6) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence_sep", "c_numerical", "label_raw"])
        for k in range(per_label):
            for cid, name in CMCC_INTENTS.items():
                turns = ["您好请讲", f"你好，我想问问{name}，这是第{k + 1}通电话😀", "好的，马上为您查询", "谢谢"]
                w.writerow(["[SEP]".join(turns), cid, name])
    return path


def invoke(*args: str):
    result = runner.invoke(app, ["data", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, glm4_tokenizer_dir):
    d = tmp_path_factory.mktemp("cli")
    raw = write_cmcc(d / "cmcc.csv")
    invoke("convert", raw, "--format", "cmcc", "--out", d / "all.jsonl")
    cleaned = invoke("clean", d / "all.jsonl", "--out", d / "clean.jsonl")
    split = invoke("split", d / "clean.jsonl", "--ratios", "8:1:1", "--stratify", "label", "--seed", "42",
                   "--out-dir", d / "split")
    return d, cleaned, split, glm4_tokenizer_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_clean_split(pipeline):
    d, cleaned, split, _ = pipeline
    records = read_jsonl(d / "all.jsonl")
    assert len(records) == 204 and {r["label"] for r in records} == set(range(34))
    assert records[7]["messages"][2]["content"] == "意图：7：办理开通"
    assert "emoji" in cleaned.output and "204 written" in cleaned.output
    assert "😀" not in (d / "clean.jsonl").read_text(encoding="utf-8")
    parts = {n: read_jsonl(d / "split" / f"{n}.jsonl") for n in ("train", "dev", "test")}
    assert sum(map(len, parts.values())) == 204 and len(parts["train"]) == 163
    assert {r["label"] for r in parts["train"]} == set(range(34))


def test_stats(pipeline):
    d, _, _, tok = pipeline
    out = invoke("stats", d / "split" / "train.jsonl", "--template", "glm4", "--tokenizer", tok, "--cutoff", "64")
    assert "p50/p90/p99/max" in out.output and "over cutoff 64" in out.output and "办理开通" not in out.output
    js = invoke("stats", d / "split" / "train.jsonl", "--template", "glm4", "--tokenizer", tok, "--cutoff", "64",
                "--json")
    stats = json.loads(js.stdout)
    assert stats["records"] == 163 and stats["over_cutoff"] == 163 and len(stats["labels"]) == 34
    assert stats["tokens"]["p50"] <= stats["tokens"]["p90"] <= stats["tokens"]["p99"] <= stats["tokens"]["max"]


def test_render_marks_plain_ids_and_generation_prompt(pipeline):
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    d, _, _, tok = pipeline
    f = d / "split" / "dev.jsonl"
    rec = read_jsonl(f)[1]
    answer = rec["messages"][-1]["content"]
    marked = invoke("render", f, "--template", "glm4", "--tokenizer", tok, "--index", "1")
    assert f"[[\n{answer}<|endoftext|>]]" in marked.stdout  # no colour under CliRunner: brackets
    plain = invoke("render", f, "--template", "glm4", "--tokenizer", tok, "--index", "1", "--plain").stdout
    tpl, tokenizer = get_template("glm4"), load_tokenizer(tok)
    assert plain == tpl.render(rec["messages"]) and plain.startswith("[gMASK]<sop><|system|>")
    assert plain.endswith(answer)  # no trailing newline added
    ids = json.loads(invoke("render", f, "--template", "glm4", "--tokenizer", tok, "--index", "1", "--ids").stdout)
    assert ids == tpl.encode(tokenizer, rec["messages"]).input_ids
    gen = invoke("render", f, "--template", "glm4", "--tokenizer", tok, "--index", "1", "--plain",
                 "--add-generation-prompt").stdout
    assert gen.endswith("<|assistant|>") and answer not in gen.split("<|user|>")[-1]
    gen_ids = json.loads(invoke("render", f, "--template", "glm4", "--tokenizer", tok, "--index", "1", "--ids",
                                "--add-generation-prompt").stdout)
    assert gen_ids == ids[:len(gen_ids)]  # the inference prompt is a prefix of the training ids


def test_registered_name_and_dedupe_merge(pipeline, monkeypatch):
    d, _, _, _ = pipeline
    (d / "datasets.yaml").write_text("cmcc_raw:\n  file: cmcc.csv\n  format: cmcc\n", encoding="utf-8")
    monkeypatch.chdir(d)
    invoke("convert", "cmcc_raw", "--out", "by_name.jsonl")
    assert len(read_jsonl(d / "by_name.jsonl")) == 204
    out = invoke("dedupe", "by_name.jsonl", "--out", "dedup.jsonl")
    assert "near duplicates" in out.output
    invoke("merge", "split/train.jsonl", "split/dev.jsonl", "--out", "merged.jsonl")
    assert len(read_jsonl(d / "merged.jsonl")) == 163 + 20


def test_bad_input_through_cli_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n', encoding="utf-8")
    result = runner.invoke(app, ["data", "convert", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert isinstance(result.exception, InputError) and f"{bad}:1:" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()
