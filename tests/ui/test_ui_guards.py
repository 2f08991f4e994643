"""The UI's guard rails without a browser: the workspace path guard, uploads, the config form, the
one-training-at-a-time slot and Stop, binding rules, and the CLI without gradio (fast, no model)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from glmtune.errors import ConfigError, InputError
from glmtune.ui.workspace import Workspace, safe_name


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_paths_resolve_inside_the_workspace_only(ws, tmp_path):
    (ws.root / "data").mkdir()
    (ws.root / "data" / "a.jsonl").write_text("{}\n")
    assert ws.resolve("data/a.jsonl", must_exist=True) == ws.root / "data" / "a.jsonl"
    assert ws.resolve(str(ws.root / "data" / "a.jsonl")) == ws.root / "data" / "a.jsonl"
    assert ws.resolve("data/../data/a.jsonl") == ws.root / "data" / "a.jsonl"
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")  # a link out of the workspace
    for outside in ("/etc/passwd", "../secret.txt", "data/../../secret.txt", "link.txt", "~/x"):
        with pytest.raises(InputError, match="outside the workspace"):
            ws.resolve(outside, field="input")
    with pytest.raises(InputError, match="does not exist"):
        ws.resolve("data/missing.jsonl", must_exist=True)
    with pytest.raises(InputError, match="no path given"):
        ws.resolve("  ")


def test_uploads_are_renamed_typed_and_size_limited(ws, tmp_path):
    src = tmp_path / "my data.csv"
    src.write_text("a,b\n1,2\n")
    dest = ws.save_upload(src)
    assert dest == ws.root / "uploads" / "my_data.csv" and dest.read_text() == "a,b\n1,2\n"
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("..\\x.csv") == "x.csv"
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 3 * 2**20)
    with pytest.raises(InputError, match="over the 2 MB upload limit"):
        ws.save_upload(big, max_mb=2)
    exe = tmp_path / "run.sh"
    exe.write_text("echo")
    with pytest.raises(InputError, match="unsupported file type"):
        ws.save_upload(exe)
    assert sorted(p.name for p in (ws.root / "uploads").iterdir()) == ["my_data.csv"]
    (ws.root / "runs" / "r").mkdir(parents=True)
    (ws.root / "runs" / "r" / "metrics.jsonl").write_text("")
    assert ws.files() == ["runs/r/metrics.jsonl", "uploads/my_data.csv"]
    assert ws.files(skip=("runs",)) == ["uploads/my_data.csv"]


def test_config_form_round_trips_and_names_bad_keys(ws):
    from glmtune.ui.config import STARTER, form_values, raw_from_form, save, section_messages

    values = form_values(STARTER)
    raw = raw_from_form(values)
    assert raw["train"]["max_steps"] == 30 and raw["train"]["lr"] == 0.005
    assert raw["data"]["datasets"] == ["data/train.jsonl"] and raw["data"]["packing"] is False
    assert form_values(raw) == values
    # the model folder does not exist yet: a ConfigError naming model.path, shown beside "model"
    with pytest.raises(ConfigError, match="model.path") as e:
        save(ws, values, "configs/a.yaml")
    assert section_messages(e.value)[0].startswith("**error:**")
    assert not (ws.root / "configs").exists()


def test_config_paths_must_stay_in_the_workspace(ws):
    from glmtune.ui.config import STARTER, form_fields, form_values, save

    model = ws.root / "models" / "tiny-glm4"  # what check_model looks at: config.json and weight files
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "glm4"}')
    # the smallest whole safetensors file (an empty header): an empty file is refused as cut short
    (model / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    (ws.root / "data").mkdir()
    for name in ("train", "dev"):
        (ws.root / "data" / f"{name}.jsonl").write_text("")
    values = form_values(STARTER)
    keys = [f"{s}.{k}" for s, k, _ in form_fields()]
    assert "saved configs/lora.yaml" in save(ws, values, "configs/lora.yaml")
    saved = yaml.safe_load((ws.root / "configs" / "lora.yaml").read_text())
    assert saved["model"]["path"] == "models/tiny-glm4" and saved["train"]["max_steps"] == 30
    values[keys.index("output.dir")] = "/tmp/elsewhere"
    with pytest.raises(ConfigError, match="output.dir.*outside the workspace"):
        save(ws, values, "configs/lora.yaml")
    values[keys.index("output.dir")] = "runs/x"
    values[keys.index("train.lr")] = "-1"
    with pytest.raises(ConfigError, match="train.lr"):
        save(ws, values, "configs/lora.yaml")
    assert yaml.safe_load((ws.root / "configs" / "lora.yaml").read_text()) == saved  # untouched


def test_malformed_yaml_names_the_upload_and_line(tmp_path):
    from glmtune.ui.config import load_yaml

    bad = tmp_path / "gradio-temp" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("model:\n  path: x\n  dtype: [fp32\n")
    with pytest.raises(ConfigError, match=r"^bad\.yaml:\d+: invalid YAML"):
        load_yaml(bad, "bad.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: {path: x}\ndata: {datasets: [a]}\noutput: {dir: o}\ntrain: {lr_rate: 1}\n")
    with pytest.raises(ConfigError, match="train.lr_rate.*unknown key"):
        load_yaml(unknown, "unknown.yaml")


def test_one_job_at_a_time_and_stop_interrupts_it(ws):
    from glmtune.ui.jobs import JobSlot

    slot = JobSlot("training")
    # a child that writes a file atomically on Ctrl-C, as the CLI's KeyboardInterrupt path does
    code = ("import time, pathlib\ntry:\n    print('wor' + 'king', flush=True); time.sleep(60)\n"
            "except KeyboardInterrupt:\n    pathlib.Path('interrupted').write_text('ok'); raise SystemExit(130)")
    job = slot.start([sys.executable, "-c", code], cwd=ws.root, log=ws.ui_path("logs", "t.log"))
    with pytest.raises(InputError, match="already running"):
        slot.start([sys.executable, "-c", "pass"], cwd=ws.root, log=ws.ui_path("logs", "u.log"))
    # Ctrl-C only reaches the except clause once the child is inside its try: wait for the line it
    # prints there (the bound is only against a hang; a loaded box makes Python start slowly)
    deadline = time.time() + 300
    while "working" not in job.tail() and job.running and time.time() < deadline:
        time.sleep(0.1)
    assert "working" in job.tail() and job.state() == "running", job.tail()
    # a long grace: SIGINT is what is tested, a SIGKILL on a slow box would not write the file
    assert "stopped" in slot.stop(grace_s=300)
    assert job.state() == "stopped" and (ws.root / "interrupted").read_text() == "ok"
    assert slot.stop() == "no training run is running"
    done = slot.start([sys.executable, "-c", "print('hi')"], cwd=ws.root, log=ws.ui_path("logs", "v.log"))
    done.proc.wait(300)
    assert done.state() == "finished" and "hi" in done.tail()


def test_loss_rows_skip_a_half_written_line(tmp_path):
    from glmtune.ui.train import read_rows

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_rows(path)] == [1, 2]
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_other_hosts_need_a_login(monkeypatch):
    from glmtune.ui.app import check_bind, parse_auth

    monkeypatch.delenv("GLMTUNE_UI_AUTH", raising=False)
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("::1", None)
    with pytest.raises(InputError, match="--auth"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", parse_auth("admin:pw"))
    monkeypatch.setenv("GLMTUNE_UI_AUTH", "u:p:with:colons")
    assert parse_auth(None) == ("u", "p:with:colons")
    with pytest.raises(InputError, match="USER:PASSWORD"):
        parse_auth("nopassword")


def test_cli_refuses_an_open_host_without_login():
    env = {**os.environ, "GLMTUNE_UI_AUTH": ""}
    r = subprocess.run([sys.executable, "-m", "glmtune.cli.main", "ui", "--host", "0.0.0.0", "--workspace",
                        "/nonexistent-not-created"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--auth" in r.stderr
    assert not Path("/nonexistent-not-created").exists()


def test_cli_without_gradio_still_works(monkeypatch, capsys, tmp_path):
    """`glmtune --help` never imports gradio; without it `glmtune ui` says what to install."""
    r = subprocess.run([sys.executable, "-c", "import glmtune.cli.main as m, sys; m.register_commands(); "
                        "print('gradio' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    import importlib.util

    from glmtune.cli.main import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["ui", "--workspace", str(tmp_path / "w")])
    assert e.value.code == 2 and 'pip install -e ".[ui]"' in capsys.readouterr().err


def test_command_forms_come_from_the_command_and_keep_paths_inside(ws):
    """Synthesize / Align tabs: a form per command from its own options; absent commands give no tab."""
    import typer

    from glmtune.cli.ui import cli_commands
    from glmtune.ui.cli_form import argv, find_command, form_params

    root = cli_commands()
    assert find_command(("data", "convert"), "glmtune.data.pipeline", root) is not None
    assert find_command(("no-such-command",), "glmtune.data", root) is None
    assert find_command(("data", "crawl"), "glmtune.no_such_module", root) is None

    app = typer.Typer(add_completion=False)

    @app.command()
    def crawl(url: str = typer.Argument(...), out: Path = typer.Option(..., "--out"), depth: int = typer.Option(1),
              same_domain: bool = typer.Option(True, "--same-domain/--any-domain"), llm: str = typer.Option("")):
        pass

    cmd = typer.main.get_command(app)
    params = form_params(cmd)
    assert [p.name for p in params] == ["url", "out", "depth", "same_domain", "llm"]
    (ws.root / "models" / "m").mkdir(parents=True)
    args = argv(ws, ("data", "crawl"), params, ["http://127.0.0.1:8000/", "pages", "2", False, "models/m"])
    assert args == ["data", "crawl", "http://127.0.0.1:8000/", "--out", "pages", "--depth", "2", "--any-domain",
                    "--llm", "models/m"]
    with pytest.raises(InputError, match="outside the workspace"):
        argv(ws, ("data", "crawl"), params, ["http://x/", "/tmp/elsewhere", "1", True, ""])
    with pytest.raises(InputError, match="outside the workspace"):  # an existing path, even in a str option
        argv(ws, ("data", "crawl"), params, ["http://x/", "pages", "1", True, "/etc"])
    with pytest.raises(InputError, match="required"):
        argv(ws, ("data", "crawl"), params, ["", "pages", "1", True, ""])
    import gradio as gr

    from glmtune.ui.cli_form import build_form
    from glmtune.ui.jobs import JobSlot
    with gr.Blocks():
        build_form(ws, ("data", "crawl"), cmd, JobSlot("data crawl"))  # the tab renders from the command


def test_the_whole_app_builds_with_its_tabs(ws):
    from glmtune.cli.ui import cli_commands
    from glmtune.ui.app import build_app
    blocks = build_app(ws.root, cli_commands())
    labels = [b.label for b in blocks.blocks.values() if type(b).__name__ == "Tab"]
    assert labels[:1] == ["Data"] and {"Config", "Train", "Evaluate", "Chat"} <= set(labels)
    # the crawl / synthesize / augment and align commands are in the package: their tabs are there
    assert {"Synthesize", "Align"} <= set(labels)
    from glmtune.ui.cli_form import find_command, leaf_commands
    group = find_command(("align",), "glmtune.align", cli_commands())
    assert [w for w, _ in leaf_commands(("align",), group)][:2] == [("align", "rm"), ("align", "dpo")]


def test_chat_reply_streams_each_piece_with_history():
    from glmtune.ui.chat import LoadedModel, reply

    class FakePredictor:
        def stream_chat(self, messages, **gen):
            self.messages, self.gen = messages, gen
            yield from ["你", "好", "!"]

    loaded = LoadedModel()
    with pytest.raises(InputError, match="no model is loaded"):
        next(reply(loaded, "hi", [], "", 0.0, 16))
    loaded.predictor = FakePredictor()
    history = [{"role": "user", "content": [{"type": "text", "text": "q1"}]}, {"role": "assistant", "content": "a1"}]
    states = [shown[-1]["content"] for shown, cleared in reply(loaded, "q2", history, "be brief", 0.7, 16)]
    assert states[:3] == ["你", "你好", "你好!"]
    assert loaded.predictor.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                                         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert loaded.predictor.gen == {"temperature": 0.7, "max_new_tokens": 16}
    assert loaded.unload().startswith("**done:** unloaded") and loaded.predictor is None


def test_demo_workspace_holds_the_sample_and_the_tiny_model(ws, monkeypatch):
    import glmtune.ui.config as config_tab
    from glmtune.data.sample import sample_path
    from glmtune.ui.app import prepare_demo

    built = []
    monkeypatch.setattr(config_tab, "build_tiny_model", lambda w, folder: built.append((w.root, folder)))
    prepare_demo(ws)
    assert (ws.root / "uploads" / "cmcc34_sample.csv").read_bytes() == sample_path("cmcc34").read_bytes()
    assert built == [(ws.root, "models/tiny-glm4")]  # the path the Config tab's defaults use


def test_a_terminated_server_stops_its_running_jobs(tmp_path):
    """SIGTERM to the UI process = Ctrl-C; on the way out the job slots stop their children."""
    import signal
    code = ("import sys, time\nfrom pathlib import Path\nfrom glmtune.ui.app import _signals_for_jobs\n"
            "from glmtune.ui.jobs import JobSlot\n_signals_for_jobs()\n"
            f"job = JobSlot('training').start([sys.executable, '-c', 'import time; time.sleep(120)'], "
            f"cwd=Path({str(tmp_path)!r}), log=Path({str(tmp_path / 'job.log')!r}))\n"
            "print(job.proc.pid, flush=True)\nwhile True:\n    time.sleep(0.1)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(server.stdout.readline())
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_launch_prints_its_url_and_no_share_advice(ws, capfd):
    """gradio's "To create a public link, set `share=True`" is advice glmtune refuses (the page reads
    the workspace); the one line printed is where the UI is."""
    import signal
    import socket

    import gradio as gr

    from glmtune.ui.app import launch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _, url, share_url = launch(ws.root, port=port, block=False)
        gr.close_all()
    finally:
        for sig, handler in handlers.items():  # launch makes SIGTERM act as Ctrl-C: not in pytest
            signal.signal(sig, handler)
    out = capfd.readouterr()
    assert url == f"http://127.0.0.1:{port}/" and share_url is None
    assert f"glmtune ui on {url}" in out.out and "share" not in (out.out + out.err).lower()
