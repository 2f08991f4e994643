"""Fixed-size packed rows for CUDA-graphed training (glmtune.train.graphs): the row layout, the
best-fit packer, and the decoder stack's loss and gradients against each sequence run on its own
(fp32, eager on CPU; the graphs themselves are checked on the GPU in tests/train/test_speed_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.train.graphs import GraphedDecoder, fixed_row
from glmtune.train.data import pack_rows_best_fit


def test_fixed_row():
    ids, labels, pos = fixed_row([[5, 6, 7], [8, 9]], None, 7, pad_id=0)
    assert ids == [5, 6, 7, 8, 9, 0, 0]
    assert labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]
    assert pos == [0, 1, 2, 0, 1, 0, 1]
    _, labels, _ = fixed_row([[5, 6, 7]], [[IGNORE_INDEX, IGNORE_INDEX, 7]], 3, pad_id=0)
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 7]


def test_best_fit_rows_are_full_and_cover_the_stream():
    import numpy as np

    lengths = [int(x) for x in np.random.default_rng(1).integers(300, 1100, size=64)]
    rows = list(pack_rows_best_fit(lengths, 2048, lookahead=16))
    assert sorted(i for r in rows for i in r) == list(range(64))
    fill = [sum(lengths[i] for i in r) for r in rows]
    assert max(fill) <= 2048
    assert sum(fill) / (2048 * len(rows)) > 0.9  # best fit keeps padding under 10% here
    assert list(pack_rows_best_fit([3, 4, 1], 5, lookahead=2)) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than a row of 8"):
        list(pack_rows_best_fit([2, 9], 8))


def _tiny(arch: str):
    from transformers import Glm4Config, Glm4ForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(0)
    if arch == "glm4_moe_lite":  # MLA attention, routed experts (tokens of a row routed independently)
        from glmtune.models.tiny import TINY_GLM4_MOE_LITE
        return Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**{**TINY_GLM4_MOE_LITE, "vocab_size": 128, "pad_token_id": 0,
                                                           "eos_token_id": 1}))
    return Glm4ForCausalLM(Glm4Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=128,
                                      partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0))


@pytest.mark.parametrize("arch", ["glm4", "glm4_moe_lite"])
def test_stack_loss_equals_each_sequence_alone(arch):
    model = _tiny(arch)
    model.config._attn_implementation = "sdpa"
    seqs = [torch.randint(1, 128, (n,)).tolist() for n in (7, 11, 5)]
    ref_sum, ref_n = 0.0, 0
    for s in seqs:  # each conversation alone: the ground truth for packing
        t = torch.tensor([s])
        ref_sum = ref_sum + model(input_ids=t, labels=t).loss * (len(s) - 1)
        ref_n += len(s) - 1
    ref_sum.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    dec = GraphedDecoder(model, tokens=32, max_segments=8, graph=False, varlen=False)
    ids, labels, pos = fixed_row(seqs, None, 32, pad_id=0)
    loss, n = dec.loss_sum(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos]), [len(s) for s in seqs])
    assert int(n) == ref_n
    assert dec.token_mask.tolist() == [True] * sum(map(len, seqs)) + [False] * (32 - sum(map(len, seqs)))
    assert abs(float(loss) - float(ref_sum)) < 1e-4 * float(ref_sum)
    loss.backward()
    for name, g in ref_grads.items():
        p = dict(model.named_parameters())[name]
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match=r"rows must be \(1, 32\)"):
        dec.loss_sum(torch.tensor([ids[:8]]), torch.tensor([labels[:8]]), torch.tensor([pos[:8]]), [7])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedDecoder(model, tokens=32, graph=True, varlen=False)


WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from transformers import Glm4Config, Glm4ForCausalLM
from peft import LoraConfig, get_peft_model
from glmtune.data.cutoff import Example
from glmtune.train.graphs import GraphedDecoder
from glmtune.train.loop import _graphed_step


class Acc:  # what _graphed_step uses of accelerate's Accelerator
    def __init__(self, world):
        self.num_processes, self.device = world, torch.device("cpu")

    def reduce(self, t, op):
        t = t.clone()
        if self.num_processes > 1:
            dist.all_reduce(t)
        return t

    def backward(self, loss):
        loss.backward()


def step(rank, world):
    torch.manual_seed(0)
    base = Glm4ForCausalLM(Glm4Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=128,
                                      partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0))
    base.config._attn_implementation = "sdpa"
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    exs = [Example(ids, [-100] * 3 + ids[3:]) for ids in
           (torch.randint(1, 128, (n,), generator=g).tolist() for n in (9, 14, 6, 11, 7, 12))]
    mine = exs if world == 1 else exs[rank::world]
    dec = GraphedDecoder(model, tokens=32, max_segments=8, graph=False, varlen=False)
    res = _graphed_step(dec, [mine], Acc(world), pad_id=0)
    grads = {n: p.grad.flatten()[:6].tolist() for n, p in model.named_parameters() if p.requires_grad}
    return {"grads": grads, "n": float(res.n_global), "tokens": res.input_tokens}


def run(rank, world, out):
    dist.init_process_group("gloo", init_method="file://" + out + ".store", rank=rank, world_size=world)
    two = step(rank, world)
    if rank == 0:  # the reference: one process, every conversation
        json.dump({"1": step(0, 1), "2": two}, open(out, "w"))


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(2, sys.argv[1]), nprocs=2)
'''


def test_graphed_step_over_two_processes_equals_one(tmp_path):
    """The graphed step under several processes (gloo here, NCCL on GPUs): the gradients, summed by
    the decoder's own all-reduce and divided by the trained tokens of all processes, equal one process
    running every conversation; so the graphs can run per process under DDP."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    path = tmp_path / "grads.json"
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(path.read_text())
    one, two = out["1"], out["2"]
    assert one["n"] == two["n"] == sum(n - 3 for n in (9, 14, 6, 11, 7, 12))
    assert two["tokens"] < one["tokens"]  # rank 0's share of the input tokens
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) == 2 * 6 * 2  # 2 layers x 6 linears (GLM-4 fuses gate_up) x A, B
    for name, g in one["grads"].items():
        assert torch.allclose(torch.tensor(two["grads"][name]), torch.tensor(g), atol=1e-6, rtol=1e-4), name
    assert any(abs(x) > 1e-6 for g in one["grads"].values() for x in g)
