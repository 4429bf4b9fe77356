#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks (scripts/wheels.txt) for Python 3.12 on manylinux x86-64, at the
# versions installed in this environment, into .whl/ (ignored by git) or the folder given, for the device call to
# carry: `bash scripts/make_wheels.sh` then run scripts/gpu_check.sh there with .whl carried. Beside them,
# tested_with.json records this environment's torch, transformers, huggingface-hub and diffusers versions (the
# ones flowsteer's tests ran with), which the kit reports beside the device's.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dest="${1:-$repo/.whl}"
limit=$((40 * 1024 * 1024))

listed=$("$python" - "$repo/scripts/wheels.txt" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1]):
    name = line.split("#", 1)[0].strip()
    if not name:
        continue
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"make_wheels: {name} is not installed here; run pip install -e '.[test]' first")
PY
) || exit 1
mapfile -t specs <<<"$listed"
mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
echo "make_wheels: ${specs[*]}"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${specs[@]}"
"$python" - "$dest/tested_with.json" <<'PY' || exit 1
import datetime
import json
import platform
import sys
from importlib.metadata import version

versions = {name: version(name) for name in ("torch", "transformers", "huggingface-hub", "diffusers")}
record = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "versions": versions}
with open(sys.argv[1], "w") as file:
    json.dump(record, file, indent=1)
    file.write("\n")
print("make_wheels: tested with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
PY
total=$(du -cb "$dest"/*.whl | tail -n 1 | cut -f 1)
ls -l "$dest"/*.whl
echo "make_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest"
if [ "$total" -gt "$limit" ]; then
  echo "make_wheels: the wheels take $((total / 1048576)) MiB, over the 40 MiB the device call can carry" >&2
  exit 1
fi
