"""tests/conftest.py turns a skip outside the opt-in markers into a failure (so `.ci/run` fails when a
core test skips), while a gpu / real_model / slow test may still skip; comparisons with the real
ChatGLM files are deselected, with one line, where the shared data folder lacks them. Run on a
throw-away suite that uses the same conftest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# the throw-away suites need only the conftest: no installed pytest plugin is loaded (each run starts in
# ~0.5 s instead of ~2.5 s with hypothesis, anyio, benchmark, ... loading)
INNER_ENV = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

SUITE = '''
import pytest

def test_core_skips():
    pytest.skip("needs a thing")

@pytest.mark.gpu
def test_gpu_skips():
    pytest.skip("no CUDA")

def test_runs():
    assert True
'''


def test_core_skip_fails_opt_in_skip_stays_a_skip(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "test_missing_dep.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  gpu: opt-in\n")
    def run(name):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", name],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300, env=INNER_ENV)
        return out.returncode, out.stdout + out.stderr

    code, text = run("test_suite.py")
    assert code == 1 and "1 failed, 1 passed, 1 skipped" in text, text
    assert "skipped outside the opt-in markers" in text and "needs a thing" in text
    code, text = run("test_missing_dep.py")  # a module that skips itself while collected: an error
    assert code != 0 and "skipped while collecting" in text and "no_such_module_xyz" in text, text


SHARED_SUITE = '''
import pytest

@pytest.mark.shared_data
def test_marked():
    pass

def test_asks_for_the_real_files(real_chatglm3_tokenizer_dir):
    assert real_chatglm3_tokenizer_dir.name == "chatglm3-tokenizer"

def test_logic(chatglm3_tokenizer_dir):
    assert (chatglm3_tokenizer_dir / "tokenizer.model").exists()
'''


def test_real_tokenizer_comparisons_run_with_shared_data_else_are_deselected_in_one_line(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    shutil.copy(Path(__file__).with_name("synthetic_chatglm.py"), suite / "synthetic_chatglm.py")
    (suite / "test_suite.py").write_text(SHARED_SUITE)
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n  shared_data: real files\n")

    def run(shared: str):
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs"], cwd=suite,
                             capture_output=True, text=True, timeout=300, env={**INNER_ENV, "GLMTUNE_SHARED_DATA": shared})
        return out.returncode, out.stdout + out.stderr

    code, text = run("/nowhere")
    assert code == 0 and "1 passed, 2 deselected" in text, text
    line = ("2 real-tokenizer comparisons deselected: /nowhere not found; set GLMTUNE_SHARED_DATA=DIR "
            "(holding chatglm2-tokenizer and chatglm3-tokenizer) to run them")
    assert [row for row in text.splitlines() if "deselected:" in row] == [line], text
    data = tmp_path / "data"
    (data / "chatglm3-tokenizer").mkdir(parents=True)
    code, text = run(str(data))  # half there: still deselected, naming what is missing
    assert code == 0 and "1 passed, 2 deselected" in text and f"{data} has no chatglm2-tokenizer;" in text, text
    (data / "chatglm2-tokenizer").mkdir()
    code, text = run(str(data))
    assert code == 0 and "3 passed" in text and "deselected" not in text, text
