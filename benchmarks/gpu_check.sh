#!/usr/bin/env bash
# The prepared GPU check, in priority order: build the extension; the headline rows G4
# (engines a, b, c, d with a profile of each, then d* = d with the unmeasured Triton
# LayerNorms, e and b+, each in its own box) and G5; the attention row G1; the GPU tests;
# the sanitizer; G5 with CUDA graphs (engine f); then G2, G3, G6, G7 and a short training
# run. Sized for <= 9 minutes on one H100/H200 (every step has a time box and the script a
# deadline, so what does not fit drops from the end, and a hang costs its box, not the
# slot). Triton kernels launch with fixed configs (ONEREF_AUTOTUNE=1 would tune them,
# which costs minutes). Run from the repository root:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# STEPS=build,bench-G4 (comma list of step names) runs only those steps; DEADLINE_S caps the
# whole script (default 520 s; the merge after it has boxes of its own: <= 595 s in all).
# OUTDIR receives at most 8 files: build.log, tests.log, bench.log, parts.json (every part's
# rows, rewritten after each part, so a run stopped before the merge keeps them: merge it
# later with `oneref bench --merge parts.json`; removed once the merge has run), results.json,
# summary.md, throughput.png, attention.png. The short table is printed last.
# Wheels found in wheels/ are installed first with --no-deps into /tmp/oneref-site (the GPU
# image has no package index). benchmarks/fetch_wheels.sh downloads the two the image lacks
# (torchscale for the baselines, pycocotools): carry wheels/ with the working tree.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
TMP=$(mktemp -d /tmp/oneref-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1
T0=$(date +%s)
# Whole-script budget: no step runs past it, so the merge at the end always happens.
DEADLINE=${DEADLINE_S:-520}
STATUS=()

# step NAME LIMIT_S LOGFILE CMD... : run CMD under a time box, append to LOGFILE, record rc
# (nothing when STEPS is set and does not name NAME).
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [ -n "${STEPS:-}" ] && [[ ",${STEPS}," != *",${name},"* ]]; then
        return
    fi
    local t=$(date +%s)
    local left=$(( DEADLINE - (t - T0) ))
    if [ "$left" -lt 15 ]; then
        echo "== ${name}: skipped (script budget of ${DEADLINE}s spent)" | tee -a "$log"
        STATUS+=("${name}: skipped (budget spent)")
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== ${name} (limit ${limit}s, at $(( t - T0 ))s)" | tee -a "$log"
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local note="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="TIMED OUT"
    [ $rc -ne 0 ] && [ "$note" = ok ] && note="failed"
    echo "== ${name}: rc=${rc} ${note} ($(( $(date +%s) - t ))s)" | tee -a "$log"
    STATUS+=("${name}: ${note} (rc ${rc}, $(( $(date +%s) - t ))s)")
}

# 0. carried wheels ---------------------------------------------------------------------
# One wheel at a time: one that does not fit the machine does not stop the others.
install_wheels() {
    local wheel rc=0
    for wheel in wheels/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/oneref-site "$wheel" || rc=1
    done
    return $rc
}
if ls wheels/*.whl >/dev/null 2>&1; then
    export -f install_wheels
    PY="$PY" step wheels 60 "$OUT/build.log" bash -c install_wheels
    export PYTHONPATH=/tmp/oneref-site${PYTHONPATH:+:$PYTHONPATH}
fi
# What the image lacks and no wheel brought: the rows and tests that need it are lost.
for module in torchscale pycocotools; do
    "$PY" -c "import ${module}" 2>/dev/null || {
        echo "MISSING: ${module} (run benchmarks/fetch_wheels.sh here and carry wheels/)" \
            | tee -a "$OUT/build.log"
        STATUS+=("missing package: ${module}")
    }
done
XF=$("$PY" -c "import xformers, xformers.ops; print('xformers', xformers.__version__)" 2>&1 | tail -1)
echo "xformers import: ${XF}" | tee -a "$OUT/build.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/build.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/build.log"

# 1. extension build (H100 only: sm_90) ---------------------------------------------------
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
if [ -n "$NVCC" ]; then
    export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
fi
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
step build 200 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
"$PY" -c "import oneref.ops as o; print(o.backend_status('cuda'))" 2>&1 | tee -a "$OUT/build.log"

# 2. benchmark rows and tests: one process per part, merged at the end -------------------
bench() {  # bench NAME LIMIT ARGS...; then every part's rows so far into $OUT/parts.json
    local name=$1 limit=$2
    shift 2
    step "bench-${name}" "$limit" "$OUT/bench.log" "$PY" -m oneref.bench --device cuda \
        --out "$TMP/${name}" "$@"
    # shellcheck disable=SC2046
    "$PY" benchmarks/collect_parts.py "$OUT/parts.json" $(ls "$TMP"/*/results.json 2>/dev/null) \
        2>>"$OUT/bench.log"
}
# The headline rows first. Each part rewrites its results.json after every row, so a part
# stopped by its time box still contributes what it measured.
bench G4 120 --rows G4 --engines a,b,c,d --warmup 1 --repeats 3 --profile
# (d*): (d) with the Triton LayerNorms the policy does not run yet, in its own box (their
# first compile is this part's); beside (d) it shows what those kernels give the step.
bench G4dstar 60 --rows G4 --engines 'd*' --warmup 1 --repeats 3 --profile
bench G4e 120 --rows G4 --engines e --warmup 2 --repeats 3
bench G4b+ 100 --rows G4 --engines b+ --warmup 2 --repeats 3
bench G5 70 --rows G5 --engines b,c,d --warmup 1 --repeats 3 --split-samples 1024
bench G1 50 --rows G1 --quick  # ours on q, k, v and packed, SDPA, xformers

# Every failure is reported (no -x): one slot has to show all of them; -v names each test as
# it ends, so a run stopped by its box still says which ran. With pytest-xdist the Triton
# compilations of the test shapes run in 8 processes.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# A module that cannot be imported (a package the image lacks) loses its own tests only.
step gpu-tests 120 "$OUT/tests.log" "$PY" -m pytest -m gpu -v -rfE --maxfail=40 \
    --continue-on-collection-errors -p no:cacheprovider "${XDIST[@]}" tests/
if [ -f benchmarks/gpu_sanitizer.sh ]; then
    step sanitizer 90 "$OUT/tests.log" bash benchmarks/gpu_sanitizer.sh
else
    echo "== sanitizer: skipped (benchmarks/gpu_sanitizer.sh not present)" | tee -a "$OUT/tests.log"
fi

# CUDA graphs (f): batch-1 latency and batch-256 throughput only (two compiles, no sweep).
# The finiteness check compiles, the first warm-up call captures, the rest replay.
bench G5f 100 --rows G5 --engines f --warmup 2 --repeats 3 --sweep-batches 0 --split-samples 0

# The rest, as far as the deadline allows.
bench G2 30 --rows G2
bench G3 30 --rows G3
bench G6 40 --rows G6 --warmup 1 --repeats 3
bench G7 40 --rows G7 --warmup 1 --repeats 3
# The trainer end to end on the GPU (bf16 autocast, fused AdamW, the policy's kernels):
# 30 s of the default RefShapes job, then its evaluation.
step train-rec 75 "$OUT/tests.log" "$PY" -m oneref.cli train --device cuda --time-budget 30 \
    --no-progress --output-dir "$TMP/train-rec"

# 4. merge: JSON + PNG + table ------------------------------------------------------------
PARTS=$(ls "$TMP"/*/results.json 2>/dev/null)
echo
echo "elapsed $(( $(date +%s) - T0 ))s; ${XF}"
printf '%s\n' "${STATUS[@]}"
# The newest speed-of-light prediction in the tree goes beside each measured training step
# and G5 forward (without it if it cannot be read: the merge must not be lost).
PREDICTED=$(ls benchmarks/results/cost-*/roofline.json 2>/dev/null | LC_ALL=C sort | tail -1)
if [ -n "$PARTS" ]; then
    # shellcheck disable=SC2086
    { timeout 40 "$PY" -m oneref.bench --merge $PARTS --out "$OUT" \
          ${PREDICTED:+--predicted "$PREDICTED"} 2>>"$OUT/bench.log" \
      || timeout 20 "$PY" -m oneref.bench --merge $PARTS --out "$OUT" 2>>"$OUT/bench.log"; } \
        && rm -f "$OUT/parts.json"
else
    echo "no benchmark results were written (see $OUT/bench.log)"
fi
rm -rf "$TMP"
