"""The README's pipeline block runs as printed on a fresh checkout (CPU, tiny demo model), issue 12.

Opt-in (`pytest -m slow`, a few minutes on 2 cores): the block runs in bash in a scratch folder that
holds what a checkout has (configs/, datasets.yaml, glmtune/ for the samples and tokenizer)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pipeline_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The pipeline, one command per step"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_pipeline_block_names_only_files_a_checkout_has():
    block = pipeline_block()
    assert block.startswith("glmtune demo --out demo_out")
    for path in re.findall(r"\b((?:configs|glmtune/resources)/\S+)", block):
        assert (REPO / path).exists(), path


@pytest.mark.slow
def test_readme_pipeline_runs_as_printed(tmp_path):
    for name in ("configs", "datasets.yaml", "glmtune"):
        (tmp_path / name).symlink_to(REPO / name)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "glmtune").write_text(f"#!/bin/sh\nexec {sys.executable} -m glmtune \"$@\"\n")
    (bindir / "glmtune").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", pipeline_block()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = json.loads((tmp_path / "eval" / "final" / "metrics.json").read_text())
    assert metrics["n_samples"] > 0 and metrics["invalid_count"] == 0
    assert (tmp_path / "models" / "merged" / "config.json").exists()
