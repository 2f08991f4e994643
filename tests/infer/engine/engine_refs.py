"""What the engine tests compare against: transformers' own greedy generate."""
from __future__ import annotations

STOP = [151329, 151336, 151338]


def reference(model, prompt, max_new_tokens=16, **kw):
    """transformers' greedy answer, the library path the engine must equal."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=STOP, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def joining_answers(engine, prompts, max_new_tokens: int = 16, gap_s: float = 0.03, wait_s: float = 300):
    """Submit the prompts ``gap_s`` apart (each joins the ones in flight), wait for all; the Sequences."""
    import time

    seqs = []
    for p in prompts:
        seqs.append(engine.submit(p, max_new_tokens=max_new_tokens))
        time.sleep(gap_s)
    for s in seqs:
        assert s.done.wait(wait_s)
    return seqs
