"""Shared fixtures: real tokenizer folders, offline hub, small tmp dirs; and no silent skips.

Tokenizers: ../shared/data (or $GLMTUNE_SHARED_DATA) when present, else the GLM-4 tokenizer that ships
inside the package (glmtune/resources/tokenizers/glm4, its licence allows redistribution with the
licence file). The ChatGLM2/3 tokenizer is not shipped: its model licence grants use, not
redistribution, so tests that need it FAIL with where to get it instead of skipping.

A test that skips outside the opt-in markers (gpu, real_model, slow) is reported as a failure, so a
missing dependency or data folder cannot hide the core of the suite (`.ci/run` relies on this).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GLMTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
OPT_IN_MARKERS = ("gpu", "real_model", "slow")


def shared_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"{path} not found: this test needs the shared data folder; set GLMTUNE_SHARED_DATA to it "
                    f"(the ChatGLM2/3 tokenizer's licence grants use, not redistribution: glmtune does not ship it)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def glm4_tokenizer_dir() -> Path:
    from glmtune.models.tokenizer import packaged_tokenizer_dir

    shared = SHARED_DATA / "glm4-tokenizer"
    return shared if shared.exists() else packaged_tokenizer_dir("glm4")


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir() -> Path:
    return shared_dir("chatglm3-tokenizer")


@pytest.fixture(scope="session")
def chatglm2_tokenizer_dir() -> Path:
    return shared_dir("chatglm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> Path:
    """A tiny random vision-language folder (LLaVA: Qwen2 text + SigLIP 384 px, processor, tokenizer)."""
    from glmtune.models.tiny import build_tiny_vl
    return build_tiny_vl(tmp_path_factory.mktemp("vl") / "tiny-vl")


def _opted_in(item) -> bool:
    return any(item.get_closest_marker(m) for m in OPT_IN_MARKERS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip outside the opt-in markers becomes a failure naming the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not _opted_in(item) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped outside the opt-in markers {OPT_IN_MARKERS}: {reason} "
                           "(a core test must run; install what it needs)")


def _module_opted_in(path: Path) -> bool:
    """Whether a module marks all its tests opt-in (`pytestmark = pytest.mark.gpu`, ...): its imports
    may legitimately be missing (its own skip is read before pytest could see the marker)."""
    import re
    return bool(re.search(r"^pytestmark\s*=.*\bmark\.(" + "|".join(OPT_IN_MARKERS) + r")\b",
                          path.read_text(encoding="utf-8"), flags=re.M))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A test module that skips itself while being collected (pytest.importorskip) fails the same way."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(collector, pytest.Module) and not _module_opted_in(collector.path):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped while collecting: {reason} (install what it needs)"
