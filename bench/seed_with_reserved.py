"""Runs bench/seed_recipe_baseline.py unchanged (same argv) and adds the peak memory the CUDA caching
allocator reserved (`reserved_GiB`) to its JSON line: CUDA-graphed runs keep their activations in a
graph pool that `max_memory_allocated` stops counting after capture, so both recipes are also
compared on reserved memory."""
import contextlib, io, json, os, runpy, sys

import torch

seed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_recipe_baseline.py")
sys.argv = [seed] + sys.argv[1:]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    runpy.run_path(seed, run_name="__main__")
lines = [l for l in buf.getvalue().splitlines() if l.startswith("{")]
out = json.loads(lines[-1]) if lines else {"recipe": "seed", "error": "no output"}
if torch.cuda.is_available():
    out["reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
print(json.dumps(out), flush=True)
