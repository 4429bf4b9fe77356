#!/usr/bin/env bash
# flowsteer's GPU validation kit: one command on a machine with a CUDA GPU, nothing downloaded.
#
#   bash scripts/gpu_check.sh --out "$OUT"              # wheels from scripts/make_wheels.sh carried in .whl/
#   bash scripts/gpu_check.sh --dry-run --out /tmp/kit  # the same phases on the CPU, tiny backbones
#
# Installs the carried wheels (diffusers, kornia, kornia-rs, lpips: what the GPU machine's image lacks) into a
# private folder without the network, then runs scripts/gpu_check.py: environment, `pytest -m cuda`, and
# `flowsteer speed` on the full-size SD3.5-medium and FLUX.1-dev architectures. Options after the script's own
# (--wheels DIR, default .whl) go to gpu_check.py (--out, --dry-run, --budget SECONDS, --repeats N).
# PYTHON names the interpreter (default python3).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="$repo/.whl"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

site=""
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="$(mktemp -d)/site"
  echo "[gpu_check] installing $(ls "$wheels"/*.whl | wc -l) carried wheels from $wheels (no index, no dependencies)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || { echo "[gpu_check] installing the wheels failed" >&2; exit 3; }
else
  echo "[gpu_check] no wheels in $wheels: using the packages this Python already has"
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec "$python" "$repo/scripts/gpu_check.py" "${args[@]}"
