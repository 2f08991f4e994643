#!/usr/bin/env bash
# The GPU tests (`pytest -m gpu`: liger fused vs unfused, varlen vs SDPA, run_training with every
# speed lever on) on the device machine. Device call: carry=[".whl", ".device_data"], command
#   bash bench/run_gpu_tests.sh            (or with test paths/args: bash bench/run_gpu_tests.sh -k liger)
# .whl/*.whl: pydantic + its deps, liger-kernel, bitsandbytes (not in the device image);
# .whl/test/*.whl: pytest and its deps, installed only if the image's python lacks pytest;
# .device_data/glm4-tokenizer: the tests' tokenizer (../shared/data does not travel).
# Only the test files that carry the gpu marker are collected (other test modules import packages
# the device lacks, e.g. openai, pexpect). Log: $OUT/gpu_tests.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
if ! python3 -c "import pytest" 2>/dev/null && compgen -G ".whl/test/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/test/*.whl \
    >/dev/null 2>&1 || echo "warning: installing .whl/test/*.whl failed"
fi
[ -d .device_data ] && export GLMTUNE_SHARED_DATA=$PWD/.device_data
LOG=${OUT:-/tmp}/gpu_tests.txt
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 - <<'EOF'
import importlib
for m in ("torch", "transformers", "peft", "accelerate", "pydantic", "liger_kernel", "bitsandbytes", "triton", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), end="; ")
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, end="; ")
import torch
print("\ncuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$LOG"
if [ $# -eq 0 ]; then
  mapfile -t FILES < <(grep -rlE --include='test_*.py' "^pytestmark = \[?pytest.mark.gpu" tests | sort)
  set -- "${FILES[@]}"
fi
python3 -m pytest -m gpu -q -rs --durations=10 "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
