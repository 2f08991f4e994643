"""LLM judge against a local OpenAI-compatible server; score parsing; QWK/MSE hand-checked."""
from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glmtune.evaluate.judge import (RUBRICS, OpenAIChatJudge, Scale, judge_report_files, parse_score,
                                   score_regression_metrics)

IELTS = Scale(5.0, 8.0, 0.5)

# Essay id -> replies in call order (the last one repeats). ESSAY-C is malformed once, then valid;
# ESSAY-D is always malformed; ESSAY-E first gets an HTTP 500.
CANNED = {
    "ESSAY-A": ['{"score": 6.5, "reason": "clear"}'],
    "ESSAY-B": ["Overall band: 7"],
    "ESSAY-C": ["This essay is quite good.", '```json\n{"score": 5.5}\n```'],
    "ESSAY-D": ["I would give it a nine", "Band 9.5", "6.3"],
    "ESSAY-E": ["<500>", "8"],
}


@pytest.fixture
def judge_server():
    calls: Counter = Counter()
    seen_auth: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen_auth.append(self.headers.get("Authorization"))
            prompt = body["messages"][-1]["content"]
            essay = next(k for k in CANNED if k in prompt)
            replies = CANNED[essay]
            reply = replies[min(calls[essay], len(replies) - 1)]
            calls[essay] += 1
            if reply == "<500>":
                self.send_response(500)
                self.end_headers()
                return
            out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the OS picks a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls, seen_auth
    server.shutdown()
    server.server_close()


def test_judge_run_retries_and_reports(tmp_path, judge_server):
    url, calls, seen_auth = judge_server
    rows = [{"question": "Some people think...", "prediction": f"{k} text", "reference_score": ref}
            for k, ref in zip(CANNED, [6.5, 7.0, 6.0, 7.0, 7.5])]
    judge = OpenAIChatJudge(url, "judge-model", api_key="sk-test", timeout=10)
    template, scale = RUBRICS["ielts"]
    try:
        m = judge_report_files(rows, judge, template, scale, tmp_path, retries=2, workers=3)
    finally:
        judge.close()
    assert calls == {"ESSAY-A": 1, "ESSAY-B": 1, "ESSAY-C": 2, "ESSAY-D": 3, "ESSAY-E": 2}
    assert set(seen_auth) == {"Bearer sk-test"}
    results = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["score"] for r in results] == [6.5, 7.0, 5.5, None, 8.0]
    failed = [json.loads(x) for x in (tmp_path / "failed_judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and failed[0]["replies"][-1] == "6.3"
    assert "HTTPStatusError" in results[4]["replies"][0]
    assert m["n_scored"] == 4 and m["n_failed"] == 1 and m["failed_rate"] == 0.2
    # Regression metrics use only the 4 scored rows: ref [6.5,7,6,7.5] vs pred [6.5,7,5.5,8].
    assert m["mse"] == pytest.approx((0 + 0 + 0.25 + 0.25) / 4) and m["mae"] == pytest.approx(0.25)
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["qwk"] == pytest.approx(m["qwk"])
    assert "failed_judgments.jsonl" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_cli_judge(tmp_path, judge_server, monkeypatch):
    from typer.testing import CliRunner
    import glmtune.cli.eval  # noqa: F401
    from glmtune.cli.main import app
    url, _, seen_auth = judge_server
    data = tmp_path / "essays.jsonl"
    data.write_text("\n".join(json.dumps({"prediction": f"{k}", "reference_score": 6.5}) for k in ("ESSAY-A", "ESSAY-B")),
                    encoding="utf-8")
    monkeypatch.setenv("MY_KEY", "secret")
    res = CliRunner().invoke(app, ["eval", "judge", "--data", str(data), "--out", str(tmp_path / "o"), "--url", url,
                                   "--model", "m", "--rubric", "ielts", "--api-key-env", "MY_KEY"])
    assert res.exit_code == 0, res.output
    assert "scored 2/2" in res.output and set(seen_auth) == {"Bearer secret"}


def test_parse_score():
    assert parse_score('{"score": 6.5, "reason": "ok"}', IELTS) == 6.5
    assert parse_score("Reasoning... Band: 7", IELTS) == 7.0
    assert parse_score("**Score:** 5.5", IELTS) == 5.5
    assert parse_score("7.5", IELTS) == 7.5
    assert parse_score("6.3", IELTS) is None          # between bands
    assert parse_score('{"score": 9}', IELTS) is None  # off the scale
    assert parse_score("no number here", IELTS) is None
    assert parse_score("评分：8", Scale(1, 10, 1)) == 8


def test_regression_metrics_hand_checked():
    t, p = [5.0, 6.0, 7.0, 8.0], [5.0, 6.5, 7.0, 7.5]
    m = score_regression_metrics(t, p)
    assert m["mse"] == pytest.approx(0.125) and m["mae"] == pytest.approx(0.25)
    # Pearson by hand: dt = [-1.5,-.5,.5,1.5], dp = [-1.5,0,.5,1]; cov 4.0/√5·√3.5
    assert m["pearson"] == pytest.approx(4.0 / (5.0 ** 0.5 * 3.5 ** 0.5))
    # QWK by hand on band*2 = [10,12,14,16] vs [10,13,14,15], weights (i-j)² (normalisation cancels):
    # observed Σw·O = (12-13)² + (16-15)² = 2; expected Σw·E = Σ_i Σ_j (t_i-p_j)² / n = (50+18+18+50)/4 = 34.
    assert m["qwk"] == pytest.approx(1 - 2 / 34)
    # A full IELTS range adds unused categories but distances stay in band units: same value.
    assert score_regression_metrics(t, p, lo=5.0, hi=8.0)["qwk"] == pytest.approx(1 - 2 / 34)
    assert m["exact_agreement"] == 0.5 and m["within_one_step"] == 1.0
    assert score_regression_metrics([6, 6], [6, 6])["qwk"] == 1.0


def test_cli_judge_exits_nonzero_when_every_judgment_fails(tmp_path, judge_server, capsys):
    from glmtune.cli.main import main
    url, _, _ = judge_server
    data = tmp_path / "essays.jsonl"
    data.write_text(json.dumps({"prediction": "ESSAY-D"}) + "\n", encoding="utf-8")  # always malformed
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "judge", "--data", str(data), "--out", str(tmp_path / "o"), "--url", url,
              "--model", "m", "--rubric", "ielts", "--retries", "0"])
    assert exit_.value.code == 2
    assert "every judgment failed (1 of 1)" in capsys.readouterr().err
    assert (tmp_path / "o" / "failed_judgments.jsonl").exists()  # what was learnt is still written
