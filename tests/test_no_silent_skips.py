"""tests/conftest.py turns a skip outside the opt-in markers into a failure (so `.ci/run` fails when a
core test skips), while a gpu / real_model / slow test may still skip. Run on a throw-away suite that
uses the same conftest."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        return out.returncode, out.stdout + out.stderr

    code, text = run("test_suite.py")
    assert code == 1 and "1 failed, 1 passed, 1 skipped" in text, text
    assert "skipped outside the opt-in markers" in text and "needs a thing" in text
    code, text = run("test_missing_dep.py")  # a module that skips itself while collected: an error
    assert code != 0 and "skipped while collecting" in text and "no_such_module_xyz" in text, text
