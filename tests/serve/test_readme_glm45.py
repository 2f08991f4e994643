"""The README's GLM-4.5 worked example runs as printed (issue 25): record -> render -> train -> serve.

Every command of its bash block but the last runs in bash in a scratch folder (a tiny random GLM-4.5 on the
CPU, as the block builds it); the last, `glmtune serve ...`, runs through the CLI with uvicorn swapped for
an in-process server, so the OpenAI client can ask it. Three steps of training do not teach a random model
GLM's XML, so the served model's answer is forced to the record's assistant turn (what the adapter is
trained to write) after the adapter has really generated: what is tested is that the served prompt is the
training context, id for id, and that the answer comes back with `reasoning_content` and `tool_calls`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = REPO / "tests" / "templates" / "official" / "glm45_chat_template.jinja"


def readme_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## GLM-4.5 / 4.6 / 4.7"):text.index("## Mixture-of-experts GLMs")]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, a heredoc kept with its command."""
    out, lines = [], iter(block.splitlines())
    for line in lines:
        cmd = line
        while cmd.endswith("\\"):
            cmd += "\n" + next(lines)
        heredoc = re.search(r"<<'(\w+)'", cmd)
        if heredoc:
            for body in lines:
                cmd += "\n" + body
                if body == heredoc.group(1):
                    break
        out.append(cmd)
    return out


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run the block (its serve line aside): the scratch folder, each command's (stdout, stderr), the serve
    line's arguments (variables expanded) and the record."""
    root = tmp_path_factory.mktemp("readme-glm45")
    (root / "configs").symlink_to(REPO / "configs")
    bindir = root / "bin"
    bindir.mkdir()
    (bindir / "glmtune").write_text(f"#!/bin/sh\nexec {sys.executable} -m glmtune \"$@\"\n")
    (bindir / "glmtune").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    *steps, serve = commands(readme_block())
    assert serve.startswith("glmtune serve ")
    variables, outputs = [], {}
    for cmd in steps:
        if re.match(r"^[A-Z]+=", cmd):
            variables.append(cmd)
            continue
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(variables + [cmd])], cwd=root, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{cmd}\n{run.stderr[-3000:]}"
        outputs[cmd.split("  #")[0].strip()] = run.stdout, run.stderr
    args = subprocess.run(["bash", "-c", "\n".join(variables + ["set -- " + serve.split("#")[0], 'printf "%s\\n" "$@"'])],
                          capture_output=True, text=True, check=True).stdout.split()
    record = json.loads((root / "tools.jsonl").read_text(encoding="utf-8"))
    return root, outputs, args, record


def official(tok, messages, tools, **kw):
    return tok.apply_chat_template(messages, chat_template=OFFICIAL.read_text(encoding="utf-8"), tools=tools,
                                   tokenize=False, **kw)


def test_render_prints_the_official_text(example):
    from glmtune.models.tokenizer import load_tokenizer

    root, outputs, _, record = example
    tok = load_tokenizer(root / "tiny-glm45")
    messages, tools = record["messages"], record["tools"]
    plain = outputs["glmtune data render tools.jsonl --template glm45 --plain"][0]
    assert plain.rstrip("\n") == official(tok, messages, tools)
    prompt = outputs["glmtune data render tools.jsonl --template glm45 --plain --add-generation-prompt --no-thinking"][0]
    assert prompt.rstrip("\n") == official(tok, messages[:-1], tools, add_generation_prompt=True, enable_thinking=False)
    marked = outputs["glmtune data render tools.jsonl --template glm45 --tokenizer $MODEL"][0]
    assert "<|assistant|>[[\n<think>需要查天气。</think>\n<tool_call>get_weather" in marked
    assert marked.count("[[") == 2 and marked.rstrip().endswith("北京晴，25 度。<|endoftext|>]]")
    stats = "".join(outputs["glmtune data stats tools.jsonl --template glm45 --tokenizer $MODEL"])
    assert re.search(r"reasoning tokens / turns left out\s*│\s*\d+ / 0", stats)


def test_training_ran_and_the_loss_fell(example):
    root = example[0]
    losses = [json.loads(line)["loss"] for line in (root / "runs" / "tools" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"step"' in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (root / "runs" / "tools" / "final" / "adapter_model.safetensors").exists()


@pytest.fixture(scope="module")
def served(example):
    """`glmtune serve` as printed, the model's answers forced to the record's assistant turns."""
    import glmtune.cli.serve  # noqa: F401  (registers the command)
    import glmtune.serve.app as app_module
    from glmtune.cli.main import app

    root, _, args, record = example
    built = {}

    def capture(predictor, host="127.0.0.1", port=8000, header_timeout=20.0, **app_kwargs):
        built.update(predictor=predictor, app_kwargs=app_kwargs)

    with pytest.MonkeyPatch.context() as mp:  # the serve line's relative paths are the scratch folder's
        mp.chdir(root)
        mp.setattr(app_module, "serve", capture)
        result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, result.output
    predictor = built["predictor"]
    ran = force_answers(predictor, record)
    with LiveServer(app_module.create_app(predictor, **built["app_kwargs"])) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0), record, ran


def force_answers(predictor, record) -> list:
    """Wrap the back-end: the adapter really generates a few tokens, then the answer becomes the ids the
    record trains for the assistant turn after this prompt (a prompt that is not a training context fails)."""
    from glmtune.infer.backends import Output

    tok, tpl, messages, tools = predictor.tokenizer, predictor.template, record["messages"], record["tools"]
    enc = tpl.encode(tok, messages, tools=tools)
    answers = {tuple(tpl.encode_prompt(tok, messages[:turn], tools=tools)): enc.input_ids[a:b - 1]  # stop token cut
               for turn, (a, b) in zip([1, 3], enc.turn_spans)}
    real, ran = predictor.backend.generate, []

    def generate(prompts, adapter, stop_ids, gen, on_tokens=None, cancel=None):
        ran.append((adapter, len(real(prompts, adapter, stop_ids, replace(gen, max_new_tokens=2))[0].token_ids)))
        ids = answers[tuple(prompts[0])]
        for k in range(1, len(ids) + 1) if on_tokens is not None else ():
            on_tokens(ids[:k])
        return [Output(list(ids), "stop")]

    predictor.backend.generate = generate
    return ran


def test_served_answer_has_reasoning_and_tool_calls(served):
    client, record, ran = served
    ask = record["messages"][:1]
    r = client.chat.completions.create(model="tools", messages=ask, tools=record["tools"])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert (msg.content, msg.model_extra["reasoning_content"]) == ("", "需要查天气。")
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
        [("function", "get_weather", {"city": "北京"})]
    assert ran[-1][0] == "tools" and ran[-1][1] > 0  # the trained adapter generated before the answer was forced
    chunks = list(client.chat.completions.create(model="tools", messages=ask, tools=record["tools"], stream=True))
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == "需要查天气。"
    assert [t.function.name for c in chunks for t in (c.choices[0].delta.tool_calls or [])] == ["get_weather"]


def test_served_tool_result_round_trip(served):
    client, record, _ = served
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}}
    messages = record["messages"][:1] + [
        {"role": "assistant", "content": None, "reasoning_content": "需要查天气。", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "晴，25 度"}]
    r = client.chat.completions.create(model="tools", messages=messages, tools=record["tools"])
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert (r.choices[0].message.content, r.choices[0].message.model_extra["reasoning_content"]) == \
        ("北京晴，25 度。", "工具说晴。")
