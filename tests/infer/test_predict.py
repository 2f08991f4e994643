"""`glmtune predict`: rows for `glmtune eval generate`, resumable after a kill without duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from glmtune.infer.predict import done_indexes, predict_file
from tiny_trained import QA, SYSTEM_QA

N = 24


def write_records(path, n=N):
    rows = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 6 == 5:
            msgs = [{"role": "system", "content": SYSTEM_QA[0]}, {"role": "user", "content": SYSTEM_QA[1]},
                    {"role": "assistant", "content": SYSTEM_QA[2]}]
        rows.append({"messages": msgs, "label": i % 3})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_have_prediction_and_references(trained_predictor, tmp_path):
    records = write_records(tmp_path / "d.jsonl", 7)
    stats = predict_file(trained_predictor, tmp_path / "d.jsonl", tmp_path / "p.jsonl", batch_size=3)
    assert stats == {"total": 7, "skipped": 0, "written": 7}
    rows = read_rows(tmp_path / "p.jsonl")
    assert [r["index"] for r in rows] == list(range(7))
    for row, rec in zip(rows, records):
        assert row["references"] == [rec["messages"][-1]["content"]]
        assert row["prediction"] == row["references"][0]  # the tiny model learned these answers
        assert row["prompt"] == rec["messages"][-2]["content"] and row["label"] == rec["label"]
    # Run again: nothing left to do, nothing duplicated.
    assert predict_file(trained_predictor, tmp_path / "d.jsonl", tmp_path / "p.jsonl")["written"] == 0
    assert len(read_rows(tmp_path / "p.jsonl")) == 7


def test_killed_run_resumes_without_duplicates(trained_glm4_dir, trained_predictor, tmp_path, glmtune_cmd):
    data, out = tmp_path / "d.jsonl", tmp_path / "p.jsonl"
    records = write_records(data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*glmtune_cmd, "predict", "--model", str(trained_glm4_dir), "--data", str(data),
                             "--out", str(out), "--batch-size", "2", "--max-new-tokens", "24"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 4):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(read_rows(out))
    assert 4 <= written < N, "the kill should land mid-run"
    with open(out, "a", encoding="utf-8") as f:
        f.write('{"index": 99, "predic')  # as if killed in the middle of a write
    assert len(done_indexes(out)) == written  # the torn line is dropped

    stats = predict_file(trained_predictor, data, out, batch_size=5)
    assert stats["skipped"] == written and stats["written"] == N - written
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(N))
    assert all(r["prediction"] == records[r["index"]]["messages"][-1]["content"] for r in rows)
