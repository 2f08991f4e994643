"""Recompiles of the engine's compiled layer function when the prefill goes through it (issue 24,
bench/RESULTS.md session 12). The engine of session 12's call 1 routed prefill through it; today's
runner does not, so run this against that code to see the variants.

    python3 bench/prefill_recompiles_cpu.py TINY_GLM4_FOLDER   # glmtune.models.tiny.build_tiny_glm4
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.attention.varlen  # noqa: F401 - registers the op

@torch.library.register_kernel("torch_attn::_varlen_attn", "cpu")
def _cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
         enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    outs = []
    for i in range(len(cu_seq_q) - 1):
        q = query[cu_seq_q[i]:cu_seq_q[i+1]].transpose(0, 1)
        k = key[cu_seq_k[i]:cu_seq_k[i+1]].transpose(0, 1)
        v = value[cu_seq_k[i]:cu_seq_k[i+1]].transpose(0, 1)
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        lq, lk = q.shape[1], k.shape[1]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.empty_like(query).copy_(torch.cat(outs)), torch.zeros(query.shape[1], query.shape[0]), torch.zeros(2, dtype=torch.uint64)

import glmtune.infer.engine.runner as R
R._varlen_ok = lambda: True
orig = R.ModelRunner._varlen_inputs
def vi(self, parts):
    k_slots, k_pos = R.varlen_key_indices(parts)
    cum = lambda xs: torch.tensor([0] + list(R._accumulate(xs)))
    return [cum([p.length for p in parts]), cum([p.start + p.length for p in parts]), k_slots, k_pos]
R.ModelRunner._varlen_inputs = vi
from glmtune.infer.engine import EngineSettings, create_engine
from glmtune.models.loading import load_model
torch._logging.set_logs(recompiles=True)
model = load_model(sys.argv[1], dtype="float32").eval()
engine, _, s = create_engine(model, stop_ids=[0], settings=EngineSettings(compile=True, max_slots=8))
print(s)
t = time.time(); engine.warmup(); print("warmup", time.time() - t)
from torch._dynamo.utils import counters
for n in (20, 33, 57, 90, 5):
    t = time.time()
    seqs = [engine.submit(list(range(100, 100 + n + j)), max_new_tokens=2) for j in range(1 + n % 3)]
    for q in seqs: q.done.wait(300)
    print(n, "took", round(time.time() - t, 2), dict(counters["stats"]), engine.runner.compile_failure, flush=True)
engine.close()
