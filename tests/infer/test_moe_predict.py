"""A mixture-of-experts model answers through `Predictor` / `glmtune predict`: the base through the
generation engine, a LoRA with routed-expert adapters through PEFT (the engine batches LoRA on linear
layers only, and says so), and that adapter's answers equal its exported, merged folder's (engine)."""
from __future__ import annotations

import json

import pytest

from glmtune.infer.predict import predict_file
from tiny_moe import PROMPTS, moe_adapter


@pytest.fixture(scope="module", params=[False, True], ids=["glm4_moe", "glm4_moe_lite"])
def moe_folders(request, tmp_path_factory, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4_moe
    from glmtune.train import export_merged

    root = tmp_path_factory.mktemp("moe")
    base = build_tiny_glm4_moe(root / "base", glm4_tokenizer_dir, lite=request.param, seed=1)
    adapter = moe_adapter(base, root / "adapter")
    return base, adapter, export_merged(base, adapter, root / "merged")


def test_moe_adapter_answers_like_its_merged_folder(moe_folders, tmp_path):
    from glmtune import Predictor

    base, adapter, merged = moe_folders
    with_adapter = Predictor(base, adapter=adapter, max_new_tokens=8)
    assert "engine is off: an adapter the engine cannot batch" in with_adapter.backend.engine_summary
    assert "target_parameters" in with_adapter.backend.engine_summary
    exported = Predictor(merged, max_new_tokens=8)
    plain = Predictor(base, max_new_tokens=8)
    answers = [with_adapter(q) for q in PROMPTS]
    assert answers == [exported(q) for q in PROMPTS]
    assert exported.backend.engine_summary.startswith("generation engine")  # merged: the engine runs it
    assert any(answers) and answers != [plain(q) for q in PROMPTS]
    # `glmtune predict`'s function writes the same answers
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "x"}]}) + "\n"
                            for q in PROMPTS), encoding="utf-8")
    predict_file(with_adapter, data, tmp_path / "p.jsonl", batch_size=2)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prediction"] for r in rows] == answers
