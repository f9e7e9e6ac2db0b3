#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels the GPU check needs that the GPU
# image lacks (it has no index): torchscale, for the baseline engines (a), (b) and (b+), and
# pycocotools, a dependency of the package that the data and metric tests import. The
# versions are the pins of requirements/ci.txt; the wheels are for the image's CPython 3.12
# on x86-64 Linux. They land in wheels/ (git-ignored), which gpu_check.sh installs from:
# carry that folder with the working tree. Run from the repository root:
#
#     benchmarks/fetch_wheels.sh [PYTHON_VERSION]    # default 3.12
set -eu -o pipefail

PYVER=${1:-3.12}
PINS=()
for name in torchscale pycocotools; do
    pin=$(grep -E "^${name}==" requirements/ci.txt) || {
        echo "fetch_wheels: no pin for ${name} in requirements/ci.txt" >&2
        exit 1
    }
    PINS+=("$pin")
done
mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels "${PINS[@]}"
ls -l wheels
