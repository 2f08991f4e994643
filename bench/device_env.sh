# Sourced by the device scripts (run from the repo root): offline HF, unbuffered output, and the
# wheels the device image lacks (.whl/*.whl: pydantic and its deps, liger-kernel, bitsandbytes)
# installed into $SITE, which goes first on PYTHONPATH with the repo itself.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=${GLMTUNE_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >/dev/null 2>&1 || echo "warning: installing .whl/*.whl failed"
fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
