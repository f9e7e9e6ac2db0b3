#!/usr/bin/env bash
# compute-sanitizer memcheck over the GPU tests of the native extension (tests/csrc).
# Called by the GPU check script once the extension is built on the GPU machine:
#   bash benchmarks/gpu_sanitizer.sh            # memcheck (default)
#   TOOL=racecheck bash benchmarks/gpu_sanitizer.sh
#   SANITIZER_K="" bash benchmarks/gpu_sanitizer.sh   # every GPU test (slow under memcheck)
# By default the large shapes (the 8 x 577 x 768 copies, batch 64) are left out: memcheck
# slows every access down and the small cases reach every kernel and code path.
# Exit status: non-zero when the sanitizer reports an error or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOL="${TOOL:-memcheck}"
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
if [[ ! -x "$SANITIZER" ]]; then
  echo "gpu_sanitizer: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
# PYTORCH_NO_CUDA_MEMORY_CACHING: every allocation is a real cudaMalloc, so that
# out-of-bounds accesses inside the caching allocator's blocks are caught too.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$TOOL" --error-exitcode 1 \
  --target-processes all \
  "${PYTHON:-python3}" -m pytest tests/csrc/test_csrc_gpu.py -m gpu -x -q -p no:cacheprovider \
  -k "${SANITIZER_K-not shape1 and not 64}" "$@"
