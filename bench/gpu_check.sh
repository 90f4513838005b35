#!/usr/bin/env bash
# The GPU check of issue 25 (item 6), prepared to run in one go on a machine with one CUDA GPU (H100/H200):
#
#   bash bench/gpu_check.sh [--out DIR] [--python PY] [--no-install] [--budget SECONDS] [--only PARTS] [--dry-run]
#
# from the repository root. It installs the project the Makefile's way (`make install`; the torch that
# constraints.txt pins, 2.13.0, is a CUDA 13.0 build on the default index for Linux x86_64, which needs an
# NVIDIA driver >= 580; where the installed torch is a CPU build, the pinned version is reinstalled from the
# default index without the local pip configuration's find-links), installs the anchors' environment
# (bench/.venv) if missing, then runs, each part under its own timeout and all of them within --budget seconds
# (480 by default: under 8 minutes; each part's cap can be changed with CAP_UNIT, CAP_HARVEST, CAP_PIPELINE,
# CAP_TRAIN, CAP_CPU), the last ones skipped, each with a row saying so, once the budget is spent:
#   1. unit: the CUDA variants of the unit tests (`pytest -m cuda tests/unit`: the fast step against the float64
#      autograd reference, every core gate, the training loop, the step under bf16 autocast)
#   2. harvest: the harvest benchmark on the GPU, fp32 and bf16 (`bench.run --only harvest --device cuda`)
#   3. pipeline: the tiny pipeline end to end with device=cuda, then once through `dmsae run`
#      (`pytest -m cuda tests/integration/test_cuda.py`)
#   4. train: the training-step table against the anchors on the GPU (`bench.run --full --only train`)
#   5. cpu: the host's own CPU, 2 threads, the fp32 and bf16 step against sparsify and dictionary_learning
#      (`bench.run --quick --only anchors --device cpu`): GPU machines' hosts may have AMX (the H200's had),
#      which the CPU targets name
# and writes one markdown file, DIR/gpu-check.md: a table of the parts (exit code, seconds, result) followed
# by the benchmarks' generated tables; each part's log beside it. DIR defaults to $OUT where that is set,
# else bench/results/gpu-check-<UTC time>.
#
# --dry-run: the same wiring on the CPU of a machine without a GPU (DEVICE=cpu, quick benchmarks, the existing
# .venv, no install): the CUDA tests are collected and skip ("no CUDA device"), the benchmarks run on the CPU.
# --only PARTS: a comma-separated subset of unit,harvest,pipeline,train,cpu (default: all five).
# --python PY: use this interpreter, with the project and its dependencies already importable, and install
# nothing (a machine that reaches no package registry: carry the wheels and install them first; bench/gpu_wheels.sh
# fetches the ones a GPU image with torch lacks, 51 MiB for Python 3.12, and says how to install them there).
# --bundle DIR: the last folder bench/gpu_bundle.sh made (its other parts already copied to /tmp/stage): runs its
# install.sh, then uses the image's python3 with the installed packages on PYTHONPATH (no registry needed).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DEVICE=${DEVICE:-cuda}
BUDGET=480
INSTALL=1
PY=""
BUNDLE=""
ONLY=unit,harvest,pipeline,train,cpu
OUT_DIR=${OUT:-}
MODE_TRAIN=--full
MODE_HARVEST=--full
ANCHORS=${ANCHORS:-"sae-lens==6.54.12 dictionary-learning==0.1.0 eai-sparsify==1.3.3"}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --python) PY=$2; INSTALL=0; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --bundle) BUNDLE=$2; INSTALL=0; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --dry-run) DEVICE=cpu; INSTALL=0; MODE_TRAIN=--quick; MODE_HARVEST=--quick; shift ;;
    -h|--help) awk 'NR > 1 && /^set -uo/ {exit} NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT_DIR=${OUT_DIR:-bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
REPORT=$OUT_DIR/gpu-check.md
ROWS=$OUT_DIR/.rows
: >"$ROWS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
THREADS=$(nproc 2>/dev/null || echo 2)
[ "$THREADS" -gt 8 ] && THREADS=8
START=$(date +%s)

say() { echo "gpu_check [$(( $(date +%s) - START )) s] $*" >&2; }
row() { printf '| %s | `%s` | %s | %s | %s |\n' "$@" >>"$ROWS"; }

# ---- 0. install (not counted in the budget: a fresh machine downloads a few GB) ---------------------------
setup() {
  if [ "$INSTALL" = 1 ]; then
    say "make install (the Makefile's install path)"
    timeout 1200 make install || { echo "make install failed"; return 1; }
    PY=$REPO/.venv/bin/python
    CUDA_REINSTALLED=0
    if [ "$DEVICE" != cpu ] && [ "$("$PY" -c 'import torch; print(torch.version.cuda is None)')" = True ]; then
      local v
      v=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
      say "torch $v here is a CPU build: reinstalling torch==$v from the default index (a CUDA build on Linux x86_64)"
      # PIP_CONFIG_FILE=/dev/null: pip reads no configuration file, so a find-links that holds a CPU wheel
      # of the same version (a `+cpu` local version, which pip would prefer) is not consulted
      timeout 1200 env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= \
        "$REPO/.venv/bin/pip" install --no-cache-dir --force-reinstall --no-deps "torch==$v" || return 1
      timeout 1200 env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= \
        "$REPO/.venv/bin/pip" install --no-cache-dir "torch==$v" || return 1
      CUDA_REINSTALLED=1
    fi
    if [ ! -x bench/.venv/bin/python ]; then
      # the Makefile's `bench-venv` where it has one (the pins of bench/requirements-anchors.txt), else the pins
      # here; without the local pip configuration when the project's torch had to be replaced by a CUDA build
      local nocfg=()
      [ "$CUDA_REINSTALLED" = 1 ] && nocfg=(env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL=)
      if grep -q '^bench-venv:' Makefile; then
        say "the anchors' environment: make bench-venv"
        timeout 1200 "${nocfg[@]}" make bench-venv
      else
        local tv
        tv=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
        say "the anchors' environment bench/.venv: torch==$tv $ANCHORS"
        python3 -m venv bench/.venv && timeout 1200 "${nocfg[@]}" bench/.venv/bin/pip install --quiet "torch==$tv" \
          $ANCHORS && bench/.venv/bin/pip uninstall -y --quiet torchvision
      fi || echo "the anchors' environment failed to install: the train table will have the dmsae rows only"
    fi
  fi
  if [ -n "$BUNDLE" ]; then
    say "installing the bundle: bash $BUNDLE/install.sh"
    bash "$BUNDLE/install.sh" || { echo "the bundle's install.sh failed"; return 1; }
    PY=${PY:-python3}
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
  fi
  PY=${PY:-$REPO/.venv/bin/python}
  [ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "no interpreter at $PY (run make install)"; return 1; }
  "$PY" - "$DEVICE" <<'EOF'
import sys, platform, torch
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
if device != "cpu" and not torch.cuda.is_available():
    sys.exit("this torch sees no CUDA device; nothing to check (--dry-run runs the wiring on the CPU)")
EOF
}

say "output in $OUT_DIR (device $DEVICE, budget $BUDGET s after the install)"
t0=$(date +%s)
setup >"$OUT_DIR/setup.log" 2>&1
rc=$?
cat "$OUT_DIR/setup.log" >&2
row setup "$([ "$INSTALL" = 1 ] && echo 'make install; ')torch check" "$rc" "$(( $(date +%s) - t0 ))" "$(if [ "$rc" = 0 ]; then grep -E '^(python|GPU 0)' "$OUT_DIR/setup.log"; else tail -n 2 "$OUT_DIR/setup.log"; fi | tr '\n|' ' /')"
FAILED=$(( rc != 0 ))

CHECKS_START=$(date +%s)
# run NAME CAP_SECONDS COMMAND...: one part under min(CAP, what is left of the budget); its log in DIR/NAME.log
run() {
  local name=$1 cap=$2
  shift 2
  case ",$ONLY," in *",$name,"*) ;; *) return ;; esac
  local left=$(( BUDGET - ($(date +%s) - CHECKS_START) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$rc" != 0 ]; then
    row "$name" "$*" - 0 "not run: the setup failed"; return
  fi
  if [ "$left" -lt 20 ]; then
    row "$name" "$*" - 0 "not run: the budget of $BUDGET s is spent"; say "$name: skipped, budget spent"; return
  fi
  say "$name: $* (timeout $limit s)"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local code=$?
  local secs=$(( $(date +%s) - t ))
  local result
  [ "$code" = 0 ] || FAILED=1
  if [ "$code" = 124 ] || [ "$code" = 137 ]; then
    result="timed out after $limit s"
  elif grep -qE '^[0-9]+ (passed|failed|skipped|deselected|error)|^no tests ran' "$OUT_DIR/$name.log"; then
    result=$(grep -E '^[0-9]+ (passed|failed|skipped|deselected|error)|^no tests ran' "$OUT_DIR/$name.log" | tail -n 1)
  elif [ -f "$OUT_DIR/bench-$name.md" ]; then
    result="$(grep -c '| PASS |' "$OUT_DIR/bench-$name.md") PASS, $(grep -c '| MISS |' "$OUT_DIR/bench-$name.md") MISS (tables below)"
  else
    result=$(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-160)
  fi
  say "$name: exit $code in $secs s: $result"
  row "$name" "$*" "$code" "$secs" "$result"
}

run unit "${CAP_UNIT:-120}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/unit
run harvest "${CAP_HARVEST:-120}" "$PY" -m bench.run "$MODE_HARVEST" --only harvest --device "$DEVICE" --threads "$THREADS" \
  --out "$OUT_DIR/bench-harvest.md" --note "bench/gpu_check.sh"
run pipeline "${CAP_PIPELINE:-200}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/integration/test_cuda.py
run train "${CAP_TRAIN:-300}" "$PY" -m bench.run "$MODE_TRAIN" --only train --device "$DEVICE" --threads "$THREADS" \
  --out "$OUT_DIR/bench-train.md" --note "bench/gpu_check.sh"
run cpu "${CAP_CPU:-150}" "$PY" -m bench.run --quick --only anchors --device cpu --threads 2 \
  --out "$OUT_DIR/bench-cpu.md" --note "bench/gpu_check.sh: the GPU machine's host CPU, 2 threads"

{
  echo "# GPU check (bench/gpu_check.sh)"
  echo
  echo "Made on $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), device \`$DEVICE\`, from commit" \
       "\`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git diff --quiet 2>/dev/null || echo ' (with local changes)');" \
       "the checks took $(( $(date +%s) - CHECKS_START )) s of a $BUDGET s budget (the setup apart)."
  echo
  grep -E '^(python|GPU 0)' "$OUT_DIR/setup.log" | sed 's/^/- /'
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/- nvidia-smi: /'
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores"
  echo
  echo "| part | command | exit | seconds | result |"
  echo "|---|---|---:|---:|---|"
  cat "$ROWS"
  for name in harvest train cpu; do
    if [ -f "$OUT_DIR/bench-$name.md" ]; then
      echo
      echo "---"
      echo
      sed -e 's/^# Benchmarks: the tables of the last run/# The '"$name"' benchmark/' -e 's/^## /### /' \
          "$OUT_DIR/bench-$name.md"
    fi
  done
} >"$REPORT"
rm -f "$ROWS"
say "wrote $REPORT"
cat "$REPORT"
exit "$FAILED"  # 0 only when the setup and every part that ran exited 0
