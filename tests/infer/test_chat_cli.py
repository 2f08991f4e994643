"""`glmtune chat` driven in a pseudo-terminal: streaming answers equal Predictor's greedy answers."""
from __future__ import annotations

import os
import sys

import pexpect

from tiny_trained import QA, SYSTEM_QA

PROMPT = "you> "


def spawn(args, timeout=90, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NO_COLOR": "1", "COLUMNS": "200"}
    return pexpect.spawn(sys.executable, ["-m", "glmtune", *args], env=env, encoding="utf-8",
                         timeout=timeout, dimensions=(40, 200), **kw)


def ask(child, question: str) -> str:
    child.sendline(question)
    child.expect(r"glm> (.*?)\r\n")
    answer = child.match.group(1)
    child.expect_exact(PROMPT)
    return answer


def test_chat_session(trained_glm4_dir, trained_predictor):
    child = spawn(["chat", "--model", str(trained_glm4_dir), "--max-new-tokens", "24"])
    try:
        child.expect_exact(PROMPT)
        assert ask(child, QA[0][0]) == trained_predictor(QA[0][0]) == QA[0][1]
        # History is kept: the second question is answered in the context of the first.
        assert ask(child, QA[1][0]) == trained_predictor(QA[1][0], history=[QA[0]])
        assert ask(child, "你好") == trained_predictor("你好", history=[QA[0], QA[1]])
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact(PROMPT)
        system, q, a = SYSTEM_QA
        child.sendline(f"/system {system}")
        child.expect_exact("system prompt set")
        child.expect_exact(PROMPT)
        assert ask(child, q) == trained_predictor(q, system=system) == a
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_wrong_model_folder(tmp_path):
    child = spawn(["chat", "--model", str(tmp_path / "missing")])
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 2
    assert "model not found" in out and "Traceback" not in out


def test_ctrl_c_stops_the_answer_then_quits_with_130(random_glm4_dir):
    """A random model never hits a stop token: only Ctrl-C ends its 4000-token answer.

    Every step waits on what the chat prints, never on the clock, so a loaded machine only makes it
    slower: Ctrl-C is sent once the answer is visibly streaming (the generation thread runs and the
    main thread is in the stream loop), and the answer is cut if far fewer than 4000 tokens came."""
    import signal

    from glmtune.models.tokenizer import load_tokenizer

    # a cold start (torch + model load) on a box shared with other test runs takes minutes, not 90 s
    child = spawn(["chat", "--model", str(random_glm4_dir), "--max-new-tokens", "4000"], timeout=600)
    try:
        child.expect_exact(PROMPT)
        child.sendline("hello")
        child.expect(r"glm> ((?s:.){40})")  # 40 characters of the answer have streamed
        streamed = child.match.group(1)
        child.kill(signal.SIGINT)
        child.expect_exact("\r\n(answer stopped")
        streamed += child.before
        child.expect_exact(PROMPT)
        child.sendline("/reset")  # the chat goes on
        child.expect_exact("conversation cleared")
        child.expect_exact(PROMPT)
        child.kill(signal.SIGINT)  # at the prompt: quit
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130 and child.signalstatus is None
    assert "Traceback" not in child.before and "Aborted" not in child.before
    answer_tokens = len(load_tokenizer(random_glm4_dir)(streamed.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"])
    assert 0 < answer_tokens < 1000, answer_tokens  # stopped at Ctrl-C, not run to the 4000-token end


def test_three_quick_ctrl_c_end_the_chat_without_a_traceback(random_glm4_dir):
    """After an answer was stopped, Ctrl-C pressed three times: the first quits, the others land in
    interpreter shutdown (atexit hooks, thread joins), which used to print "Exception ignored in ..."
    tracebacks or die by SIGINT; now the process ends at once with 130."""
    import signal
    import time
    child = spawn(["chat", "--model", str(random_glm4_dir), "--max-new-tokens", "4000"])
    try:
        child.expect_exact(PROMPT)
        child.sendline("hello")
        child.expect_exact("glm> ")
        time.sleep(0.5)
        child.kill(signal.SIGINT)
        child.expect_exact("answer stopped")
        child.expect_exact(PROMPT)
        for _ in range(3):
            child.kill(signal.SIGINT)
            time.sleep(0.05)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert (child.exitstatus, child.signalstatus) == (130, None)
    assert "Traceback" not in child.before and "Exception ignored" not in child.before


def test_chat_shows_reasoning_apart_and_keeps_it_out_of_the_answer(tmp_path, glm45_tokenizer_dir):
    """A model speaking GLM-4.5: the chat prints its thinking after [thinking], then the answer; the
    next turn's prompt holds the answer as the template renders history (reasoning dropped)."""
    import io

    from glmtune import Predictor
    from glmtune.infer.chat import run_chat
    from tiny_trained import trained_tiny_glm45

    p = Predictor(trained_tiny_glm45(tmp_path, glm45_tokenizer_dir), max_new_tokens=32)
    lines, out, prompts = iter(["你好", "你好", "/exit"]), io.StringIO(), []
    prepare = p.prepare
    p.prepare = lambda messages, tools=None, template=None: (prompts.append(list(messages)), prepare(messages, tools))[1]
    run_chat(p, read=lambda _: next(lines), out=out)
    assert "glm> [thinking] 打招呼。\n你好！\n" in out.getvalue()
    assert prompts[1][1] == {"role": "assistant", "content": "你好！", "reasoning_content": "打招呼。"}
