#!/usr/bin/env bash
# Build .whl/: the wheels the device image lacks (KINDS.md lists what it has), for python 3.12 on
# x86_64, as bench/device_env.sh installs them. Run here (pip reaches the package registry), then
# name ".whl" in the device call's carry. The set is what the serve, align, MoE and QLoRA benches
# import: the HTTP stack and OpenAI client for bench/serve_gpu.py, TRL + datasets for
# bench/align_throughput.py, liger-kernel, and bitsandbytes slimmed to its CUDA 13 library (the
# carry limit is 64 MiB for the whole working tree).
#
#   bash bench/build_wheels.sh            # -> .whl/*.whl, and the total size
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PINS=(
  # HTTP serving and the OpenAI client (the image has anyio, h11, idna, uvloop, typing-extensions' older copy)
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 anyio==4.16.0 sniffio==1.3.1 opentelemetry-api==1.45.2
  openai==3.57.0 jiter==0.19.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 distro==1.9.0
  # alignment benches (the image has pyarrow, fsspec, xxhash, pandas)
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  # kernels
  liger-kernel==0.8.5 bitsandbytes==0.50.2
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  if compgen -G ".whl/$(echo "$name" | tr - _)-${pin##*==}-*.whl" >/dev/null; then continue; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pin" || { echo "error: could not download $pin" >&2; exit 1; }
done
# bitsandbytes ships a library per CUDA / ROCm / XPU version; the image's torch is cu130: keep that and the CPU one
for whl in .whl/bitsandbytes-*.whl; do
  tmp=$(mktemp -d)
  (cd "$tmp" && python3 -m zipfile -e "$OLDPWD/$whl" . >/dev/null)
  find "$tmp" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130*' ! -name 'libbitsandbytes_cpu*' -delete
  rm -f "$whl"
  (cd "$tmp" && python3 -m zipfile -c "$OLDPWD/$whl" ./* >/dev/null)
  rm -rf "$tmp"
done
du -ch .whl/*.whl | tail -1
