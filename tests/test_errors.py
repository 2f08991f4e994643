"""InputError's one line: file:line, field, problem, fix, with paths printed exactly as the user gave them."""
from __future__ import annotations

import os
import subprocess
import sys

from glmtune.errors import ConfigError, InputError


def test_paths_with_dotdot_print_as_given():
    err = InputError("file not found", file="../../etc/nope.jsonl", line=3, field="path",
                     fix="check ../../etc and the path")
    assert str(err) == "../../etc/nope.jsonl:3: field 'path': file not found. Fix: check ../../etc and the path"
    assert str(ConfigError("folder ../runs is missing", field="output.dir")) == \
        "field 'output.dir': folder ../runs is missing."


def test_a_problem_that_ends_in_a_period_gets_no_second_one():
    assert str(InputError("row has fewer fields (missing label).", file="a.csv", line=2)) == \
        "a.csv:2: row has fewer fields (missing label)."
    assert str(InputError("bad value", fix="write 1.")) == "bad value. Fix: write 1."


def test_cli_error_names_a_dotdot_path_as_typed(tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "glmtune", "data", "convert", "../../etc/nope.jsonl",
                           "--out", "x.jsonl"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.strip().startswith("error: ../../etc/nope.jsonl: ")
    assert not (work / "x.jsonl").exists()
