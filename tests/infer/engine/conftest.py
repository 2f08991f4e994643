"""Fixtures for the generation engine: a tiny random GLM-4 in fp32 and its reference `generate`."""
from __future__ import annotations

import pytest

from engine_refs import STOP


@pytest.fixture(scope="module")
def tiny_model(random_glm4_dir):
    from glmtune.models.loading import load_model
    return load_model(random_glm4_dir, dtype="float32").eval()


@pytest.fixture(scope="module")
def prompts():
    """Prompts of several lengths sharing a 70-token prefix (a system prompt, a few-shot block)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 150000, (70,), generator=g).tolist()
    return [shared + torch.randint(0, 150000, (n,), generator=g).tolist() for n in (5, 9, 13, 2, 30, 200)]


@pytest.fixture
def make_engine(tiny_model):
    """create_engine(...) for one test, closed afterwards."""
    from glmtune.infer.engine import EngineSettings, create_engine

    made = []

    def make(model=None, adapters=None, lora=None, **settings):
        engine, lora, _ = create_engine(model or tiny_model, stop_ids=STOP, adapters=adapters, lora=lora,
                                        settings=EngineSettings(**settings))
        made.append((engine, lora))
        return engine

    yield make
    for engine, lora in made:
        engine.close()
        if lora is not None:
            lora.remove()
