"""Several LoRA adapters in one batch: each row's answer equals PEFT's with that adapter alone."""
from __future__ import annotations

import pytest
from engine_refs import STOP


@pytest.fixture(scope="module")
def adapters(random_glm4_dir, tmp_path_factory):
    """Two random adapters on different layers, ranks and scalings (one rsLoRA), saved as training does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loading import load_model

    specs = {"alpha": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_up_proj", "down_proj"]),
             "beta": dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "v_proj"], use_rslora=True)}
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(load_model(random_glm4_dir, dtype="float32"), LoraConfig(**spec))
        for pname, p in model.named_parameters():
            if "lora_B" in pname:  # trained-looking, not the zero init
                torch.nn.init.normal_(p, std=0.5)
        dirs[name] = tmp_path_factory.mktemp("adapters") / name
        model.save_pretrained(dirs[name])
    return dirs


def peft_answer(random_glm4_dir, adapters, name, prompt):
    import torch
    from peft import PeftModel

    from glmtune.models.loading import load_model

    base = load_model(random_glm4_dir, dtype="float32")
    model = PeftModel.from_pretrained(base, str(adapters[name]), adapter_name=name).eval() if name else base.eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             eos_token_id=STOP, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_mixed_adapters_in_one_batch_equal_peft(make_engine, random_glm4_dir, adapters, prompts):
    from glmtune.models.loading import load_model

    engine = make_engine(model=load_model(random_glm4_dir, dtype="float32").eval(), adapters=adapters)
    plan = [(prompts[0], 0), (prompts[1], 1), (prompts[2], -1), (prompts[3], 1), (prompts[4], 0)]
    seqs = [engine.submit(p, max_new_tokens=16, adapter=a) for p, a in plan]
    for s in seqs:
        assert s.done.wait(120)
    names = [None, "alpha", "beta"]
    expected = [peft_answer(random_glm4_dir, adapters, names[a + 1], p) for p, a in plan]
    assert [s.tokens for s in seqs] == expected
    assert expected[0] != peft_answer(random_glm4_dir, adapters, None, prompts[0])  # the adapter matters


def test_an_adapter_the_engine_cannot_batch_is_named(random_glm4_dir, tmp_path):
    import json

    from glmtune.infer.engine import UnsupportedAdapter
    from glmtune.infer.engine.lora import read_adapter

    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    with pytest.raises(UnsupportedAdapter, match="use_dora: True"):
        read_adapter(folder)


@pytest.mark.parametrize("compile,fuse,padded", [(False, False, False), (False, True, False), (True, True, False),
                                                 (False, True, True)])
def test_mixed_adapters_and_a_joining_base_request_equal_peft(compile, fuse, padded, make_engine, random_glm4_dir,
                                                              adapters, prompts):
    """torch.compile'd decode forward over fused q/k/v (what CUDA runs by default), or the padded
    prefill forward prefill graphs capture: base rows and adapter rows of one batch, requests joining
    mid-flight, each answer equal to PEFT's, and the compiled / padded path did run."""
    from glmtune.infer.engine import MultiLoRA, fuse_projections
    from glmtune.models.loading import load_model

    model = load_model(random_glm4_dir, dtype="float32").eval()
    lora = MultiLoRA(model, adapters)  # as the back-end does: adapters read, then layers fused, then hooked
    if fuse:
        lora.remove()
        assert fuse_projections(model) == model.config.num_hidden_layers
        lora.attach(model)
    engine = make_engine(model=model, lora=lora, compile=compile, prefill_graphs=padded)
    padded_calls = []
    if padded:
        graphs = engine.runner.prefill_graphs
        body = graphs.body
        graphs.body = lambda views, *a: padded_calls.append(a) or body(views, *a)
    plan = [(prompts[0], 0), (prompts[1], -1), (prompts[2], 1), (prompts[4], -1)]
    seqs = [engine.submit(p, max_new_tokens=16, adapter=a) for p, a in plan[:3]]
    seqs[0].done.wait(300)
    seqs.append(engine.submit(plan[3][0], max_new_tokens=16, adapter=-1))  # joins after the others
    for s in seqs:
        assert s.done.wait(300)
    names = [None, "alpha", "beta"]
    assert [s.tokens for s in seqs] == [peft_answer(random_glm4_dir, adapters, names[a + 1], p) for p, a in plan]
    assert bool(padded_calls) == padded and all(adapters_on for *_, adapters_on in padded_calls)
    if compile:
        assert engine.runner.compile_failure is None
        assert "the decode forward is compiled" in engine.graphs_note
