"""A non-editable install carries what glmtune reads from inside its package: the accelerate presets
(`--accelerate-config ddp`), the GLM-4 tokenizer and the sample data. Builds the wheel from a copy of
the tree with setuptools (what `pip install .` runs) and reads the wheel's file list."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_package_resources(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "glmtune", src / "glmtune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_wheel('dist')"],
                   cwd=src, check=True, capture_output=True, timeout=300)
    wheel, = (src / "dist").glob("glmtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    from glmtune.train.launch import ACCELERATE_DIR, ACCELERATE_PRESETS
    package = REPO / "glmtune"
    for preset in ACCELERATE_PRESETS:
        assert f"glmtune/{(ACCELERATE_DIR / f'{preset}.yaml').relative_to(package).as_posix()}" in names
    for resource in (package / "resources").rglob("*"):
        if resource.is_file():
            assert f"glmtune/{resource.relative_to(package).as_posix()}" in names, resource
    assert "glmtune/resources/tokenizers/glm4/tokenizer.model" in names
