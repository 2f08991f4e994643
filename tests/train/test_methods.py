"""The battery every method passes: loss falls, trained weights change, frozen ones don't, the saved
weights reload (plain PEFT / transformers) and give the same logits as the model that trained."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from glmtune.train import run_training

METHOD_LR = {"lora": 2e-2, "prefix": 5e-2, "full": 3e-3, "freeze": 3e-3}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def _reload(method, base, final):
    from transformers import AutoModelForCausalLM
    if method in ("lora", "prefix"):
        from peft import PeftModel
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(final)).eval()
    return AutoModelForCausalLM.from_pretrained(final).eval()


@pytest.mark.parametrize("method", ["lora", "prefix", "full", "freeze"])
def test_method_trains_saves_and_reloads(method, make_cfg, tiny_model):
    cfg = make_cfg(method, **{"method.name": method, "train.lr": METHOD_LR[method], "train.max_steps": 5,
                              "method.trainable_layers": 1, "method.num_virtual_tokens": 4})
    res = run_training(cfg, return_model=True)
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.05, losses

    base = load_file(tiny_model / "model.safetensors")
    if method == "lora":
        ad = load_file(res.adapter_path / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in ad.items())  # B starts at 0
        for n, p in res.model.get_base_model().named_parameters():
            if "lora_" not in n:
                assert torch.equal(p.detach(), base[n.replace(".base_layer", "")]), n
    elif method == "prefix":
        ad = load_file(res.adapter_path / "adapter_model.safetensors")
        assert list(ad) == ["prompt_embeddings"]
        for n, p in res.model.get_base_model().named_parameters():
            assert torch.equal(p.detach(), base[n]), n
    else:
        trained = load_file(next(res.adapter_path.glob("model*.safetensors")))
        changed = {k for k in base if not torch.equal(base[k], trained[k])}
        if method == "full":
            assert "model.embed_tokens.weight" in changed and "model.layers.0.mlp.down_proj.weight" in changed
        else:  # freeze, last 1 of 2 layers: layer 1 and the final norm train, the rest is untouched
            assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)
            assert "model.layers.1.mlp.down_proj.weight" in changed

    ids = torch.tensor([[151331, 151333, 151336, 198, 2345, 1234, 151337, 198, 40, 41]])
    reloaded = _reload(method, tiny_model, res.adapter_path)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(res.model, ids), rtol=1e-5, atol=1e-5)
