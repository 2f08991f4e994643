"""JSONL written and read with JSON's own line rules; NaN / duplicate keys / lone surrogates / deep
nesting refused with file:line; `--out` refuses folders, devices and FIFOs and writes through symlinks."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from glmtune.data.pipeline import convert_file, split_file
from glmtune.data.readers import read_records
from glmtune.errors import InputError
from glmtune.io import atomic_path, iter_jsonl, jsonl_line, write_jsonl_atomic, write_text_atomic

ODD = "line\u2028sep\u2029para\u0085next"


def _rec(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], **extra}


def test_line_separators_are_escaped_on_write_and_round_trip(tmp_path):
    line = jsonl_line(_rec(ODD))
    assert "\u2028" not in line and "\u2029" not in line and "\u0085" not in line
    assert line.count("\n") == 1 and "\\u2028" in line
    write_jsonl_atomic(tmp_path / "a.jsonl", [_rec(ODD), _rec("二")])
    rows = list(iter_jsonl(tmp_path / "a.jsonl"))
    assert [n for n, _ in rows] == [1, 2] and rows[0][1]["messages"][0]["content"] == ODD


def test_raw_line_separators_from_other_tools_are_read(tmp_path):
    p = tmp_path / "third_party.jsonl"
    p.write_text(json.dumps(_rec(ODD), ensure_ascii=False) + "\r\n" + json.dumps(_rec("b")) + "\n", encoding="utf-8")
    assert "\u2028" in p.read_text(encoding="utf-8")
    recs = read_records(p)
    assert [r["messages"][0]["content"] for r in recs] == [ODD, "b"] and recs[1]["meta"]["line"] == 2


def test_convert_split_round_trip_keeps_the_text_exactly(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(json.dumps(_rec(f"{ODD} {i}"), ensure_ascii=False) for i in range(10)) + "\n",
                   encoding="utf-8")
    convert_file(src, tmp_path / "all.jsonl")
    _, paths = split_file(tmp_path / "all.jsonl", tmp_path / "split", ratios="8:2")
    texts = sorted(r["messages"][0]["content"] for p in paths.values() for r in read_records(p))
    assert texts == sorted(f"{ODD} {i}" for i in range(10))


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [], "label": NaN}', "NaN is not valid JSON"),
    ('{"messages": [], "label": -Infinity}', "-Infinity is not valid JSON"),
    ('{"messages": [], "label": 1e400}', "field 'label': the number 1e400 is out of range"),
    ('{"messages": [], "meta": {"scores": [0.5, -2E999]}}', "field 'meta.scores[1]': the number -2E999"),
    ('{"messages": [], "label": NaN, "x": }', "NaN is not valid JSON"),  # invalid after it too: no traceback
    ('{"label": 1, "label": 2}', "duplicate key 'label'"),
    ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_bad_json_is_refused_with_file_and_line(tmp_path, line, problem):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_rec("fine")) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(p)
    assert e.value.line == 2 and problem in str(e.value) and str(p) in str(e.value)


def test_json_list_file_names_the_element_line(tmp_path):
    p = tmp_path / "list.json"
    p.write_text('[\n {"a": 1},\n {"label": 1, "label": 2}\n]', encoding="utf-8")
    with pytest.raises(InputError, match="duplicate key") as e:
        read_records(p, format="messages")
    assert e.value.line == 3


def test_paired_surrogate_escape_is_a_character(tmp_path):
    p = tmp_path / "emoji.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "x\\ud83d\\ude00"}, '
                 '{"role": "assistant", "content": "y"}]}\n', encoding="utf-8")
    assert read_records(p)[0]["messages"][0]["content"] == "x\U0001F600"


def test_nan_and_lone_surrogates_are_never_written(tmp_path):
    with pytest.raises(InputError, match="non-finite"):
        write_jsonl_atomic(tmp_path / "o.jsonl", [{"label": float("nan")}])
    with pytest.raises(InputError, match="lone surrogate"):
        write_jsonl_atomic(tmp_path / "o.jsonl", [{"x": "\ud800"}])
    assert not (tmp_path / "o.jsonl").exists() and not list(tmp_path.iterdir())  # no temp file left


def test_csv_duplicate_header_refused_and_response_column_used(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("text,label,label\nhi,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="column 'label' appears twice") as e:
        read_records(dup)
    assert e.value.line == 1
    resp = tmp_path / "resp.csv"
    resp.write_text("text,label,response\nhi,greet,Hello there\n", encoding="utf-8")
    rec = read_records(resp)[0]
    assert rec["messages"][-1]["content"] == "Hello there" and rec["label"] == "greet"
    other = tmp_path / "other.csv"
    other.write_text("text,label,answer\nhi,greet,Howdy\n", encoding="utf-8")
    assert read_records(other, response_col="answer")[0]["messages"][-1]["content"] == "Howdy"


def test_out_refuses_folders_devices_and_fifos(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for target, kind in ((tmp_path / "d", "folder"), (tmp_path / "fifo", "FIFO"), ("/dev/null", "device")):
        with pytest.raises(InputError, match=kind):
            write_text_atomic(target, "x")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_out_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    (tmp_path / "link.txt").symlink_to(target)
    write_text_atomic(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and target.read_text() == "new"


def test_out_os_errors_are_one_line_and_keep_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="parent of the output path is a file"):
        write_text_atomic(tmp_path / "file" / "out.jsonl", "x")
    out = tmp_path / "keep.txt"
    out.write_text("old")

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(InputError, match="disk full"):
        with atomic_path(out) as tmp:
            tmp.write_text("new")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep.txt"]


def _glmtune(*argv, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_overflowing_number_is_blamed_on_the_input_line(tmp_path):
    """`{"label": 1e400}` read as inf and failed at the output ("cannot write a non-finite number")."""
    (tmp_path / "in.jsonl").write_text(json.dumps(_rec("fine")) + "\n" + json.dumps(_rec("x"))[:-1] +
                                       ', "label": 1e400}\n', encoding="utf-8")
    proc = _glmtune("data", "convert", "in.jsonl", "--out", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: in.jsonl:2: field 'label': the number 1e400 is out of range: it reads as "
                                   "infinity. Fix: write null or a finite number instead")
    assert not (tmp_path / "out.jsonl").exists()


def test_fifo_input_is_refused_without_opening_it(tmp_path):
    """A FIFO with no writer made `open()` block: the command hung silently."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    for argv in (["data", "convert", "pipe.jsonl", "--out", "out.jsonl"], ["data", "stats", "pipe.jsonl"]):
        proc = _glmtune(*argv, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "error: pipe.jsonl: the input is a FIFO (named pipe), not a regular file" in proc.stderr
    with pytest.raises(InputError, match="not a regular file"):
        iter_jsonl(tmp_path / "pipe.jsonl").__next__()
