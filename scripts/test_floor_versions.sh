#!/usr/bin/env bash
# The floors pyproject.toml declares, proven: a second environment (a venv over this one's packages)
# with transformers, peft, accelerate and trl at exactly their floor versions runs the generation
# engine, Predictor, serve, train and align tests. torch stays the installed build (a constraint keeps
# pip from fetching another); its floor, 2.11, is the GPU image's, proven by bench/serve_gpu.py.
# ~3 minutes on 2 cores. Run after scripts/install_cpu.sh (it is the README's test command's last step).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FLOORS="transformers==5.17.0 peft==0.21.0 accelerate==1.15.0 trl==1.16.0"
VENV=${GLMTUNE_FLOOR_VENV:-${TMPDIR:-/tmp}/glmtune-floor-venv}
python3 -m venv --system-site-packages "$VENV"
constraints="$VENV/torch-constraint.txt"
python3 -c 'import torch; print(f"torch=={torch.__version__}")' > "$constraints"
"$VENV/bin/python" -m pip install -q -c "$constraints" $FLOORS
"$VENV/bin/python" -c "import transformers, peft, accelerate, trl, torch; print('floor versions:', \
  'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
  'trl', trl.__version__, 'torch', torch.__version__)"
# One pytest per folder: test modules import their folder's conftest by name.
status=0
for group in "tests/align/test_dpo.py" \
             "tests/infer/engine tests/infer/test_predictor.py" \
             "tests/serve/test_openai_server.py tests/serve/test_wedge.py" \
             "tests/train/test_config.py tests/train/test_methods.py"; do
  # shellcheck disable=SC2086
  PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfs $group || status=1
done
exit $status
