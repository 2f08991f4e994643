"""Fixtures for the generation engine: a tiny random GLM-4 in fp32 and its reference `generate`."""
from __future__ import annotations

import pytest

STOP = [151329, 151336, 151338]


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


def reference(model, prompt, max_new_tokens=16, **kw):
    """transformers' greedy answer, the library path the engine must equal."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=STOP, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.fixture
def make_engine(tiny_model):
    """create_engine(...) for one test, closed afterwards."""
    from glmtune.infer.engine import EngineSettings, create_engine

    made = []

    def make(model=None, adapters=None, **settings):
        engine, lora, _ = create_engine(model or tiny_model, stop_ids=STOP, adapters=adapters,
                                        settings=EngineSettings(**settings))
        made.append((engine, lora))
        return engine

    yield make
    for engine, lora in made:
        engine.close()
        if lora is not None:
            lora.remove()
