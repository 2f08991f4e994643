"""Alignment on TRL: reward model, DPO, GRPO and PPO (RLOO) from glmtune's configs, templates and adapters.

config.py (AlignConfig: train's sections + align:), data.py (records -> template ids for TRL),
rewards.py (label, format, similarity, length, reward_model, judge), trainers.py (one row per
algorithm: TRL config/trainer, data rows, keys), monitor.py (TRL logs -> metrics.jsonl, plots),
run.py (run_alignment: the recipe). TRL and its dependencies are imported lazily.
"""
from __future__ import annotations


def run_alignment(*args, **kwargs):
    from glmtune.align.run import run_alignment as run
    return run(*args, **kwargs)


__all__ = ["run_alignment"]
