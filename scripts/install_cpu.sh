#!/usr/bin/env bash
# Install glmtune for CPU work and tests on a fresh machine: the CPU torch build first (a bare
# `torch` requirement would pull a multi-GB CUDA build), then the package with its test extra,
# then offline data (WordNet for METEOR, a CJK font for confusion-matrix plots).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
if [ -f scripts/setup_system.sh ]; then
  bash scripts/setup_system.sh || echo "warning: system data setup failed (METEOR / CJK font may be unavailable)"
fi
