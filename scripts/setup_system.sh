#!/usr/bin/env bash
# Offline data that pip cannot bring: a CJK font for confusion-matrix plots, WordNet for METEOR, and
# Debian's chromium for the web UI's browser test (Playwright drives it; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
fc-list 2>/dev/null | grep -qi "wqy\|noto sans cjk" || need+=(fonts-wqy-microhei)
[ -d /usr/share/wordnet ] || need+=(wordnet-base wordnet-sense-index)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
bash scripts/setup_wordnet.sh
