#!/usr/bin/env bash
# flowsteer's GPU validation kit in two parts, each one device call of at most 5 minutes, nothing downloaded.
#
#   bash scripts/gpu_check.sh --part 1 --out "$OUT"   # environment, CUDA tests, SD3.5-medium and FLUX.1-dev rows
#   bash scripts/gpu_check.sh --part 2 --out "$OUT"   # today's models, flow solvers, editors, regional compile
#   bash scripts/gpu_check.sh --dry-run --out /tmp/kit  # both parts in miniature on the CPU
#
# Installs the carried wheels (.whl/ from scripts/make_wheels.sh: what the GPU machine's image lacks, for its
# Python 3.12; not in a dry run) into a private folder without the network, then runs scripts/gpu_check.py, which
# reads the versions flowsteer was tested with from the wheels' tested_with.json. Options after the script's own
# (--wheels DIR, default .whl) go to gpu_check.py (--part 1|2, --out, --dry-run, --budget SECONDS per part,
# --repeats N, --cuda-tests TEST...).
# PYTHON names the interpreter (default python3).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="$repo/.whl"
args=()
dry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --dry-run) dry=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

site=""
if [ -n "$dry" ]; then
  echo "[gpu_check] dry run: using the packages this Python already has (the wheels are the GPU machine's)"
elif compgen -G "$wheels/*.whl" >/dev/null; then
  site="$(mktemp -d)/site"
  echo "[gpu_check] installing $(ls "$wheels"/*.whl | wc -l) carried wheels from $wheels (no index, no dependencies)"
  began=$(date +%s%N)
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl || { echo "[gpu_check] installing the wheels failed" >&2; exit 3; }
  ms=$(( ($(date +%s%N) - began) / 1000000 ))
  export GPU_CHECK_INSTALL_SECONDS="$((ms / 1000)).$((ms % 1000 / 100))"
else
  echo "[gpu_check] no wheels in $wheels: using the packages this Python already has"
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec "$python" "$repo/scripts/gpu_check.py" --tested-with "$wheels/tested_with.json" "${args[@]}"
