"""`glmtune export`: the merged folder loads with plain transformers and matches the PEFT model."""
from __future__ import annotations

import json

import torch

from glmtune.train import export_merged, run_training


def test_export_logits_match_peft(make_cfg, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = run_training(make_cfg("lora", **{"train.max_steps": 2, "train.lr": 5e-2}))
    out = export_merged(None, res.adapter_path, tmp_path / "merged", shard_size="30MB")  # base from glmtune.json
    assert len(list(out.glob("model-*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "glmtune.json").read_text())["template"] == "glm4"
    assert (out / "tokenizer.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(res.adapter_path)).eval()
    ids = torch.randint(0, 151000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, peft(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits, atol=1e-4)
