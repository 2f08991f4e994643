"""Train tab: `glmtune train CONFIG [--resume ...]` in a child process, watched through metrics.jsonl.

The loss curve is `glmtune.train.monitor.plot_losses` over the run's metrics.jsonl (the file the
loop appends a line to every logged step), redrawn when new lines appear; the log is the child's
output. One training run at a time per UI server.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from glmtune.errors import ConfigError
from glmtune.ui.common import error, md_escape, ok
from glmtune.ui.jobs import JobSlot, glmtune_command
from glmtune.ui.workspace import Workspace

FRESH = "(start fresh)"


def run_config(ws: Workspace, config: str):
    """The config a run would use, validated with every path inside the workspace."""
    from glmtune.ui.config import check_workspace_paths, load_yaml
    path = ws.resolve(config, field="config file", must_exist=True)
    return path, check_workspace_paths(ws, load_yaml(path, config), config)


def checkpoint_choices(ws: Workspace, config: str) -> list[str]:
    """What a run can resume from: latest, or one of the output folder's complete checkpoints."""
    from glmtune.train.checkpoint import list_checkpoints
    try:
        _, cfg = run_config(ws, config)
    except ConfigError:
        return [FRESH]
    return [FRESH, "latest", *(p.name for p in list_checkpoints(ws.resolve(cfg.output.dir)))]


def start(ws: Workspace, slot: JobSlot, config: str, resume: str | None) -> str:
    path, cfg = run_config(ws, config)
    out = ws.resolve(cfg.output.dir, field="output.dir")
    args = ["train", ws.relative(path)]
    if resume and resume != FRESH:
        if resume != "latest":
            ckpt = ws.resolve(out / resume, field="resume", must_exist=True)
            if ckpt.parent != out:
                raise ConfigError(f"{resume} is not a checkpoint of {cfg.output.dir}", field="resume")
            resume = ws.relative(ckpt)
        args += ["--resume", resume]
    log = ws.ui_path("logs", f"train-{time.strftime('%Y%m%d-%H%M%S')}.log")
    job = slot.start(glmtune_command(*args), cwd=ws.root, log=log,
                     info={"out": out, "total": cfg.train.max_steps, "resume": resume})
    return ok(f"training started (pid {job.proc.pid}): glmtune {' '.join(args)}; log {ws.relative(log)}")


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl as written so far (a line being appended right now is skipped, not an error)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def progress_text(rows: list[dict], total: int | None, job) -> str:
    """Step, loss, tokens/s and ETA from the metrics rows (ETA from the pace since the first row seen)."""
    train = [r for r in rows if "loss" in r]
    if not train:
        return "waiting for the first step (loading model and data)…"
    last = train[-1]
    step = last["step"]
    first = job.info.setdefault("first_seen", (time.time(), step))
    parts = [f"step **{step}**" + (f" / {total}" if total else ""), f"loss {last['loss']:.4f}"]
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
    if last.get("input_tokens_per_s"):
        parts.append(f"{last['input_tokens_per_s']:,.0f} tokens/s")
    t0, s0 = first
    if total and step > s0 and job.running:
        eta = (time.time() - t0) / (step - s0) * (total - step)
        parts.append(f"ETA {eta:,.0f} s")
    return " · ".join(parts)


def poll(ws: Workspace, slot: JobSlot, shown_rows: int):
    """Timer tick: (status, loss image or skip, progress, log tail, rows shown)."""
    import gradio as gr
    job = slot.job
    if job is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), shown_rows
    rows = read_rows(job.info["out"] / "metrics.jsonl")
    # a resumed run rewrites metrics.jsonl from its step: redraw whenever the count changes
    image = loss_image(ws, rows) if rows and len(rows) != shown_rows else gr.skip()
    state = job.state()
    status = (f"**{state}** · pid {job.proc.pid} · output {md_escape(ws.relative(job.info['out']))}")
    return status, image, progress_text(rows, job.info.get("total"), job), job.tail(14), len(rows)


def loss_image(ws: Workspace, rows: list[dict]):
    """The run's loss curve (train and eval) as a PIL image, drawn by the training monitor's plotter."""
    from PIL import Image

    from glmtune.train.monitor import plot_losses
    png = ws.ui_path("loss.png")
    plot_losses(rows, png)
    with Image.open(png) as im:
        return im.copy()


def build(ws: Workspace, slot: JobSlot) -> None:
    import gradio as gr

    from glmtune.errors import GlmtuneError

    gr.Markdown("Training runs as `glmtune train CONFIG` in a separate process: the page stays responsive and "
                "the run is exactly what the command does. Stop sends Ctrl-C; finished checkpoints stay usable.")
    with gr.Row():
        config = gr.Textbox("configs/lora.yaml", label="Config file (workspace path)", elem_id="train-config")
        resume = gr.Dropdown([FRESH], value=FRESH, label="Resume from", elem_id="train-resume",
                             allow_custom_value=False)
        refresh = gr.Button("List checkpoints", elem_id="train-refresh", size="sm")
    with gr.Row():
        start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.Markdown(elem_id="train-progress")
    with gr.Row():
        curve = gr.Image(label="Loss (train and eval) vs optimizer step", type="pil", elem_id="train-loss",
                         interactive=False, format="png")
        log = gr.Textbox(label="Log (last lines)", lines=18, max_lines=18, elem_id="train-log", autoscroll=True)
    shown = gr.State(0)
    timer = gr.Timer(1.0)

    def on_start(cfg_text, resume_choice):
        try:
            return start(ws, slot, cfg_text, resume_choice), 0
        except GlmtuneError as e:
            return error(e), gr.skip()

    def on_refresh(cfg_text):
        choices = checkpoint_choices(ws, cfg_text)
        return gr.update(choices=choices, value=choices[-1] if len(choices) > 1 else FRESH)

    start_btn.click(on_start, [config, resume], [message, shown])
    def on_stop():
        running = slot.job is not None and slot.job.running
        message_text = slot.stop()
        return ok(message_text) if running else message_text

    stop_btn.click(on_stop, None, message)
    refresh.click(on_refresh, config, resume)
    timer.tick(lambda n: poll(ws, slot, n), shown, [status, curve, progress, log, shown])
