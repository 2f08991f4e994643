"""The web UI in a real browser: Debian's chromium driven by Playwright (no browser download).

`glmtune ui` runs as a child process on a free loopback port over a temporary workspace; everything
below happens through the page only: upload the demo data, convert / clean / split / inspect, build
the tiny model and write a LoRA config, train (loss curve changing while it runs), stop a run,
resume from a chosen checkpoint, evaluate (metrics table), chat (the streaming reply), unload. The guard
rails are exercised on the way: a path outside the workspace, a malformed YAML upload, a second
training start while one runs, stopping a run. Screenshots of every tab go to $GLMTUNE_UI_ARTIFACTS
(default: a temp folder printed at the end).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from glmtune.data.sample import sample_path

CHROMIUM = os.environ.get("GLMTUNE_CHROMIUM", "/usr/bin/chromium")
# generous: on a shared, loaded 2-core box everything is several times slower than on a free one
pytestmark = pytest.mark.timeout(int(os.environ.get("GLMTUNE_UI_TEST_TIMEOUT", "600")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"glmtune ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"glmtune ui did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("GLMTUNE_UI_ARTIFACTS") or tempfile.mkdtemp(prefix="glmtune-ui-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    port = free_port()
    log = ws.parent / "ui-server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "glmtune.cli.main", "ui", "--workspace", str(ws),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, log)
        yield {"url": f"http://127.0.0.1:{port}/", "ws": ws, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (scripts/setup_system.sh)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        pg.goto(server["url"])
        pg.wait_for_selector("#tab-data", state="attached")
        yield pg
        browser.close()


# -- page helpers ------------------------------------------------------------------------------------
def tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def fill(pg, elem: str, text: str) -> None:
    box = pg.locator(f"#{elem} textarea, #{elem} input").first
    box.fill(str(text))
    box.blur()


def click(pg, elem: str) -> None:
    pg.locator(f"#{elem}").click()


def shown(pg, elem: str) -> str:
    """What an element shows: a text box's value, or the element's text."""
    box = pg.locator(f"#{elem} textarea")
    return box.first.input_value() if box.count() else pg.locator(f"#{elem}").inner_text()


def wait_text(pg, elem: str, *needles: str, timeout: float = 90) -> str:
    """Wait until element `elem` shows any of `needles`; return its text."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = shown(pg, elem)
        if any(n in text for n in needles):
            return text
        time.sleep(0.25)
    raise AssertionError(f"#{elem} never showed {needles}; it shows: {text!r}")


T0 = time.time()


def shot(pg, artifacts: Path, name: str) -> None:
    pg.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    print(f"[{time.time() - T0:6.1f} s] {name}", flush=True)


def loss_src(pg) -> str | None:
    img = pg.locator("#train-loss img")
    return img.first.get_attribute("src") if img.count() else None


def as_text(shown_text: str) -> str:
    """A chat bubble's text without whitespace and Markdown marks."""
    return re.sub(r"[\s*_`~#>|\\\[\]()-]", "", shown_text)


def assert_clean_run(run: Path) -> list[dict]:
    """After Stop: metrics.jsonl parses line by line, no temp files, every checkpoint complete."""
    from glmtune.train.checkpoint import list_checkpoints
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] < 400
    # glmtune.io's temp files are removed on Ctrl-C; a checkpoint interrupted mid-save stays a hidden
    # .tmp-checkpoint-N folder that no listing or `latest` ever picks
    assert list(run.rglob("*.tmp")) == []
    yaml.safe_load((run / "config.yaml").read_text())
    for ckpt in list_checkpoints(run):
        assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "adapter_config.json").exists()
    return rows


# -- the whole pipeline through the page -----------------------------------------------------------
def test_pipeline_through_the_page(page, server, artifacts):
    pg, ws = page, server["ws"]
    t0 = time.time()

    # Data: upload the demo CSV, refuse paths outside the workspace, convert (auto-detect), clean, split
    pg.locator("#data-upload input[type=file]").set_input_files(str(sample_path("cmcc34")))
    wait_text(pg, "data-status", "uploaded uploads/cmcc34_sample.csv")
    assert (ws / "uploads" / "cmcc34_sample.csv").read_bytes() == sample_path("cmcc34").read_bytes()
    for outside in ("/etc/passwd", "../outside.csv"):
        fill(pg, "data-input", outside)
        click(pg, "data-convert")
        # wait for this path's own message: a button's click is dropped while its last one is pending
        # (Gradio's trigger_mode "once"), so the next step must not start on the previous message
        wait_text(pg, "data-status", f"{outside} is outside the workspace")
        assert not (ws / "data" / "all.jsonl").exists()
    fill(pg, "data-input", "uploads/cmcc34_sample.csv")
    click(pg, "data-convert")
    assert "204 records" in wait_text(pg, "data-status", "converted")
    click(pg, "data-clean")
    wait_text(pg, "data-status", "cleaned")
    click(pg, "data-split")
    status = wait_text(pg, "data-status", "split")
    assert "train" in status and "test" in status
    assert all((ws / "data" / f"{n}.jsonl").exists() for n in ("train", "dev", "test"))
    wait_text(pg, "data-files", "data/train.jsonl")  # the workspace file list follows each step
    click(pg, "data-stats")
    assert "over cutoff 1024" in wait_text(pg, "data-stats-out", "over cutoff")
    click(pg, "data-preview")
    pg.wait_for_selector("#data-render mark.trained")
    shot(pg, artifacts, "1-data")

    # Config: a malformed YAML upload is refused with its line and leaves no file
    tab(pg, "Config")
    bad = ws.parent / "broken.yaml"
    bad.write_text("model:\n  path: models/tiny-glm4\n  dtype: [fp32\ntrain: {}\n")
    pg.locator("#cfg-upload input[type=file]").set_input_files(str(bad))
    msg = wait_text(pg, "cfg-status", "error")
    assert "broken.yaml" in msg and "invalid YAML" in msg
    assert not (ws / "configs").exists()
    # build the tiny model; an invalid value is shown beside its section and nothing is written
    click(pg, "cfg-build-tiny")
    wait_text(pg, "cfg-status", "built a tiny random GLM-4 model", timeout=120)
    fill(pg, "cfg-train-lr", "-1")
    click(pg, "cfg-save")
    assert "train.lr" in wait_text(pg, "cfg-error-train", "error")
    assert not (ws / "configs").exists()
    # a LoRA run long enough to watch, stop and resume; batch 1 because every step computes the
    # 151k-vocabulary logits of a ~450-token conversation
    fill(pg, "cfg-train-lr", "0.005")
    fill(pg, "cfg-train-max_steps", "400")
    fill(pg, "cfg-train-batch_size", "1")
    fill(pg, "cfg-eval-every", "0")
    fill(pg, "cfg-output-save_every", "2")
    click(pg, "cfg-save")
    wait_text(pg, "cfg-status", "saved configs/lora.yaml")
    shot(pg, artifacts, "2-config")

    # Train: the loss curve changes while the run goes; a second start is refused; Stop ends it cleanly
    tab(pg, "Train")
    click(pg, "train-start")
    wait_text(pg, "train-message", "training started")
    click(pg, "train-start")
    assert "already running" in wait_text(pg, "train-message", "already running")
    wait_text(pg, "train-progress", "loss", timeout=150)
    pg.wait_for_selector("#train-loss img")
    first = loss_src(pg)
    deadline = time.time() + 90
    while loss_src(pg) == first and time.time() < deadline:
        time.sleep(0.3)
    assert loss_src(pg) != first, "the loss curve image never changed while training ran"
    assert "running" in pg.locator("#train-status").inner_text()
    run = ws / "runs" / "lora"
    from glmtune.train.checkpoint import list_checkpoints
    deadline = time.time() + 90
    while not list_checkpoints(run) and time.time() < deadline:
        time.sleep(0.3)
    shot(pg, artifacts, "3-train-running")
    click(pg, "train-stop")
    wait_text(pg, "train-message", "stopped")
    wait_text(pg, "train-status", "stopped")
    assert_clean_run(run)
    ckpt = list_checkpoints(run)[0].name  # checkpoint-2

    # resume from a chosen checkpoint; it continues from that step, then is stopped again
    click(pg, "train-refresh")
    pg.locator("#train-resume input").click()
    pg.get_by_role("option", name=ckpt).click()
    click(pg, "train-start")
    wait_text(pg, "train-message", f"--resume runs/lora/{ckpt}")
    step = int(ckpt.split("-")[1])
    wait_text(pg, "train-log", f"at step {step}", timeout=150)
    wait_text(pg, "train-progress", f"step {step + 1}", f"step {step + 2}", timeout=150)
    click(pg, "train-stop")
    wait_text(pg, "train-status", "stopped")
    log = pg.locator("#train-log textarea").input_value()
    assert f"resumed from runs/lora/{ckpt} at step {step}" in " ".join(log.split()), log
    rows = assert_clean_run(run)
    assert [r["step"] for r in rows][:step + 1] == list(range(1, step + 2))
    shot(pg, artifacts, "4-train-resumed-stopped")
    adapter = f"runs/lora/{list_checkpoints(run)[-1].name}"

    # Evaluate the trained adapter: metrics table and confusion matrix
    tab(pg, "Evaluate")
    fill(pg, "eval-adapter", adapter)
    click(pg, "eval-run")
    wait_text(pg, "eval-status", "accuracy", "error", timeout=120)
    assert "accuracy" in pg.locator("#eval-status").inner_text()
    table = wait_text(pg, "eval-metrics", "f1_macro")
    assert "accuracy" in table and "n_samples" in table
    pg.wait_for_selector("#eval-cm img")
    assert (ws / "eval" / "lora-final" / "metrics.json").exists()
    shot(pg, artifacts, "5-evaluate")

    # Chat with the trained checkpoint: the reply streams in; Unload frees it
    tab(pg, "Chat")
    fill(pg, "chat-adapter", adapter)
    click(pg, "chat-load")
    wait_text(pg, "chat-status", "loaded", "error", timeout=120)
    assert f"loaded models/tiny-glm4 + {adapter}" in pg.locator("#chat-status").inner_text()
    # record, in the page, every text the bot's last message shows while the answer streams in
    pg.evaluate("""() => {
        window.__seen = [];
        const bot = document.querySelector('#chat-bot');
        new MutationObserver(() => {
            const msgs = bot.querySelectorAll('[data-testid="bot"]');
            if (msgs.length) window.__seen.push(msgs[msgs.length - 1].innerText);
        }).observe(bot, {subtree: true, childList: true, characterData: true});
    }""")
    fill(pg, "chat-max-new", "24")
    box = pg.locator("#chat-input textarea, #chat-input input").first
    box.fill("我想取消我的流量包")
    box.press("Enter")
    assert "answered in" in wait_text(pg, "chat-status", "answered in", "error", timeout=120)
    final = pg.locator('#chat-bot [data-testid="bot"]').last.inner_text().strip()
    assert final, "no answer arrived"
    assert box.input_value() == ""  # the input box is cleared for the next message
    # the answer grew piece by piece: several distinct partial texts, each a prefix of the next,
    # before the final one (the random model writes any token, Markdown included: compare the text
    # without whitespace and Markdown marks, which rendering may move while a piece is half there)
    states: list[str] = []
    for text in map(as_text, pg.evaluate("() => window.__seen")):
        if text and text != "Loadingcontent" and (not states or text != states[-1]):
            states.append(text)
    assert states[-1] == as_text(final), states
    assert len(states) - 1 >= 3, f"the reply did not stream: the page showed only {states}"
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states
    print(f"chat: {len(states) - 1} partial replies shown before the final one", flush=True)
    shot(pg, artifacts, "6-chat")
    click(pg, "chat-unload")
    wait_text(pg, "chat-status", "unloaded")
    print(f"\nbrowser test: {time.time() - t0:.0f} s; screenshots in {artifacts}")
