"""What a user watches while training runs: metrics.jsonl, TensorBoard, loss.png, a progress bar.

Only the main process writes. metrics.jsonl is the source of truth; the plot and TensorBoard are
views of it. On resume, lines after the resumed step are dropped so the file matches the run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(rows: list[dict], out_png: str | Path) -> None:
    """Train loss (the mean over each logging window, plotted at the window's last step) and eval loss
    (per eval) against the optimizer step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glmtune.io import atomic_path

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train (mean per logging window)", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class Monitor:
    """Append metrics, mirror them to TensorBoard, refresh loss.png at most every `plot_every_s`."""

    def __init__(self, out_dir: Path, *, enabled: bool, resume_step: int = 0, tensorboard: bool = True,
                 plot: bool = True, plot_every_s: float = 10.0):
        self.enabled, self.out_dir, self.plot, self.plot_every_s = enabled, out_dir, plot, plot_every_s
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self._last_plot = 0.0
        if not enabled:
            return
        from glmtune.io import write_jsonl_atomic
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        write_jsonl_atomic(self.path, kept)
        self.rows = kept
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard not installed: metrics.jsonl and loss.png still work
                self.tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, row["step"])
        if self.plot and time.time() - self._last_plot > self.plot_every_s:
            self.refresh_plot()

    def refresh_plot(self) -> None:
        if self.enabled and self.plot:
            plot_losses(self.rows, self.out_dir / "loss.png")
            self._last_plot = time.time()

    def close(self) -> None:
        if not self.enabled:
            return
        self.refresh_plot()
        if self.tb is not None:
            self.tb.close()


class progress_bar:
    """Training progress for the main process (a no-op elsewhere): a rich bar with step, loss, lr,
    input tokens/s and ETA on a terminal; when stdout is not a terminal (a log file, CI, nohup) one
    plain line per metrics line instead, since a live bar would print nothing until the end."""

    def __init__(self, enabled: bool, total: int, completed: int, *, stream=None):
        import sys

        self.enabled, self.total, self.t0, self.start = enabled, total, time.time(), completed
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]train[/] {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[tps]} "
                                           "input tok/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=completed, loss="-", lr="-", tps="-")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc) if self.bar is not None else False

    def update(self, step: int, row: dict) -> None:
        """Show a metrics row (loss: the logging window's mean; input_tokens_per_s)."""
        if not self.enabled:
            return
        loss, lr, tps = f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['input_tokens_per_s']:,.0f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, lr=lr, tps=tps)
            return
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        print(f"train {step}/{self.total} loss {loss} lr {lr} {tps} input tok/s "
              f"elapsed {elapsed:.0f}s ETA {eta:.0f}s", file=self.stream, flush=True)
