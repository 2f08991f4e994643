"""A tiny model memorises 20 conversations: greedy generation reproduces every trained answer and
stops at the trained end token (glm4: <|endoftext|> 151329 or <|user|> 151336)."""
from __future__ import annotations

import pytest
import torch

from glmtune.train import run_training



# Opt-in (-m slow): 150 full fine-tuning steps over the 151,552-word head take ~165 s of the 20-minute CI
# budget on 2 cores. CI keeps the pieces: tests/infer/tiny_trained.py trains a tiny GLM-4 on the
# template's ids and labels until greedy generation gives its answers and stop token (the chat / serve
# tests check them), and tests/train checks run_training's losses, resume, DDP and every preset.
@pytest.mark.slow
def test_overfit_then_generate(make_cfg, tiny_model, qa_pairs):
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    cfg = make_cfg("overfit", **{"method.name": "full", "train.batch_size": 20, "train.max_steps": 150,
                                 "train.lr": 5e-3, "train.scheduler": "cosine", "train.warmup_ratio": 0.05,
                                 "train.max_grad_norm": 0.0, "data.packing": True})
    res = run_training(cfg, return_model=True)
    assert res.final_loss < 0.3, res.final_loss
    tok, tpl = load_tokenizer(tiny_model), get_template("glm4")
    stops = tpl.stop_token_ids(tok)
    for q, answer in qa_pairs:
        prompt = tpl.encode_prompt(tok, [{"role": "user", "content": q}])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = res.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     eos_token_id=stops, pad_token_id=stops[0])
        new = out[0, len(prompt):].tolist()
        assert new[-1] in (151329, 151336), (q, new)
        assert tok.decode(new[:-1]).strip() == answer, (q, tok.decode(new))
