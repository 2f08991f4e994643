"""TRL's logs -> glmtune's Monitor (metrics.jsonl, TensorBoard, loss.png) plus reward.png.

TRL logs a dict per `logging_steps` (loss, rewards/..., kl, accuracy...) and per evaluation (the
same keys prefixed `eval_`); each becomes one metrics.jsonl row `{"step": global_step, ...}`.
"""
from __future__ import annotations

from pathlib import Path

# What reward.png shows, per algorithm family: rollout rewards, DPO margins, RM accuracy.
REWARD_KEYS = ("reward", "eval_reward", "rewards/margins", "eval_rewards/margins", "accuracy", "eval_accuracy",
               "eval_heldout_margin")


def plot_rewards(rows: list[dict], out_png: str | Path) -> None:
    """Every reward-like series (REWARD_KEYS and per-reward rewards/<name>/mean) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glmtune.io import atomic_path

    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k in REWARD_KEYS or (k.startswith(("rewards/", "eval_rewards/")) and k.endswith("/mean"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), "o-" if key.startswith("eval") else "-", label=key, lw=1.2, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward / margin / accuracy")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def monitor_callback(monitor):
    """A transformers TrainerCallback feeding `monitor` (glmtune.train.monitor.Monitor)."""
    from transformers import TrainerCallback

    class GlmtuneMonitorCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step}
            row.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "step"})
            monitor.log(row)

    return GlmtuneMonitorCallback()


def close_monitor(monitor, plot: bool) -> None:
    monitor.close()
    if monitor.enabled and plot:
        plot_rewards(monitor.rows, monitor.out_dir / "reward.png")
