"""Shared fixtures: tokenizer folders, offline hub, small tmp dirs; no silent skips.

Tokenizers: GLM-4 from ../shared/data (or $GLMTUNE_SHARED_DATA) when present, else the one that ships
inside the package (glmtune/resources/tokenizers/glm4, its licence allows redistribution with the
licence file). The real ChatGLM2/3 tokenizer is not shipped (its model licence grants use, not
redistribution), so `chatglm2_tokenizer_dir` / `chatglm3_tokenizer_dir` are a synthetic one trained
here (tests/synthetic_chatglm.py): template, mask, stop-id and import logic runs on every clone. The
comparisons against the real files (`real_chatglm*_tokenizer_dir`, tests marked `shared_data`) run
when the shared data folder has them (CI does) and are otherwise deselected, with one line at the
end of the run saying how to enable them: never counted as passed, never a failure.

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
# torch's OpenMP threads sleep while they wait instead of spinning (libgomp reads this when torch is
# loaded, so it is set before any test module imports torch; subprocesses the tests start inherit it).
# On a 2-core box that other jobs also use, a spinning thread takes the core its partner needs:
# measured there with 2 threads, a tiny-model training loop ran 6-14x slower spinning than sleeping,
# and tests/evaluate took 120 s instead of 70 s (as fast as 1 thread); on idle cores sleeping costs a
# wake-up per parallel op. OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GLMTUNE_SHARED_DATA") or REPO.parent / "shared" / "data")
# How the folder is named in messages: as the user gave it, else as README says (next to the clone).
SHARED_DATA_SHOWN = os.environ.get("GLMTUNE_SHARED_DATA") or "../shared/data"
REAL_CHATGLM_FOLDERS = ("chatglm2-tokenizer", "chatglm3-tokenizer")
OPT_IN_MARKERS = ("gpu", "real_model", "slow")
_DESELECTED_REAL = pytest.StashKey[int]()


def shared_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.fail(f"{path} not found: this test needs the shared data folder; set GLMTUNE_SHARED_DATA to it "
                    f"(the ChatGLM2/3 tokenizer's licence grants use, not redistribution: glmtune does not ship it; "
                    f"mark the test shared_data so it is deselected where the folder is missing)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def glm4_tokenizer_dir() -> Path:
    from glmtune.models.tokenizer import packaged_tokenizer_dir

    shared = SHARED_DATA / "glm4-tokenizer"
    return shared if shared.exists() else packaged_tokenizer_dir("glm4")


@pytest.fixture(scope="session")
def glm45_tokenizer_dir(glm4_tokenizer_dir, tmp_path_factory) -> Path:
    """A GLM-4.5+ tokenizer folder (tokenizer.json): GLM-4's vocabulary plus GLM-4.5's added tokens at
    their official ids (<think> 151350, <tool_call> 151352, ...), as GLM-4.5/4.6/4.7 ship it."""
    from glmtune.models.tokenizer import glm45_tokenizer

    tok = glm45_tokenizer(glm4_tokenizer_dir)
    assert tok.convert_tokens_to_ids("<think>") == 151350
    out = tmp_path_factory.mktemp("glm45") / "glm45-tokenizer"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synthetic_chatglm_model() -> bytes:
    """One synthetic sentencepiece model for both families (like the real ones, they share it)."""
    from synthetic_chatglm import train_sentencepiece
    return train_sentencepiece()


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir(tmp_path_factory, synthetic_chatglm_model) -> Path:
    """A synthetic ChatGLM3 tokenizer folder: real structure, small vocabulary (read ids from it)."""
    from synthetic_chatglm import write_chatglm_tokenizer
    return write_chatglm_tokenizer(tmp_path_factory.mktemp("synthetic") / "chatglm3-tokenizer", "chatglm3",
                                   synthetic_chatglm_model)


@pytest.fixture(scope="session")
def chatglm2_tokenizer_dir(tmp_path_factory, synthetic_chatglm_model) -> Path:
    """A synthetic ChatGLM2 tokenizer folder: real structure, small vocabulary (read ids from it)."""
    from synthetic_chatglm import write_chatglm_tokenizer
    return write_chatglm_tokenizer(tmp_path_factory.mktemp("synthetic") / "chatglm2-tokenizer", "chatglm2",
                                   synthetic_chatglm_model)


@pytest.fixture(scope="session")
def real_chatglm3_tokenizer_dir() -> Path:
    """THUDM/chatglm3-6b's tokenizer files from the shared data folder (tests marked shared_data)."""
    return shared_dir("chatglm3-tokenizer")


@pytest.fixture(scope="session")
def real_chatglm2_tokenizer_dir() -> Path:
    """THUDM/chatglm2-6b's tokenizer files from the shared data folder (tests marked shared_data)."""
    return shared_dir("chatglm2-tokenizer")


@pytest.fixture(scope="session", params=["synthetic", pytest.param("real", marks=pytest.mark.shared_data)])
def chatglm_tokenizer_dirs(request) -> dict[str, Path]:
    """family -> tokenizer folder, once synthetic (always runs) and once real (shared_data): for the
    comparisons with sentencepiece and the official templates, which hold for any ChatGLM model file."""
    prefix = "real_" if request.param == "real" else ""
    return {family: request.getfixturevalue(f"{prefix}{family}_tokenizer_dir") for family in ("chatglm2", "chatglm3")}


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


def missing_real_chatglm() -> str | None:
    """What is missing for the real-tokenizer comparisons (None: they can run)."""
    if not SHARED_DATA.is_dir():
        return f"{SHARED_DATA_SHOWN} not found"
    missing = [name for name in REAL_CHATGLM_FOLDERS if not (SHARED_DATA / name).is_dir()]
    return f"{SHARED_DATA_SHOWN} has no {' or '.join(missing)}" if missing else None


@pytest.hookimpl(trylast=True)  # after -m / -k: count only what would otherwise run
def pytest_collection_modifyitems(config, items):
    """Without the real ChatGLM files, deselect the tests marked shared_data (they compare with those
    files; their logic runs on the synthetic tokenizer): not a pass, not a skip, not a failure."""
    if missing_real_chatglm() is None:
        return
    needs = [item for item in items if needs_real_chatglm(item)]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if not needs_real_chatglm(item)]
        config.stash[_DESELECTED_REAL] = len(needs)


def needs_real_chatglm(item) -> bool:
    """Marked shared_data, or asking for a real ChatGLM fixture (a forgotten mark is no failure)."""
    return bool(item.get_closest_marker("shared_data")
                or set(getattr(item, "fixturenames", ())) & {"real_chatglm2_tokenizer_dir", "real_chatglm3_tokenizer_dir"})


def pytest_terminal_summary(terminalreporter, config):
    count = config.stash.get(_DESELECTED_REAL, 0)
    if count:
        terminalreporter.write_line(f"{count} real-tokenizer comparison{'s' if count > 1 else ''} deselected: "
                                    f"{missing_real_chatglm()}; "
                                    f"set GLMTUNE_SHARED_DATA=DIR (holding {' and '.join(REAL_CHATGLM_FOLDERS)}) to run them")
