#!/usr/bin/env bash
# Fetches into .whl/ the wheels that the borrowed GPU machines lack for
# benchmarks/gpu_device.sh (their image has JAX with CUDA and Python 3.12,
# no Keras, no TFP). .whl/ stays out of git; the device tool carries it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl \
    keras tfp-nightly namex optree decorator gast dm-tree
# The MNIST files too, for a machine without the shared folder.
mkdir -p .mnist
cp -n ../shared/data/mnist/*.gz .mnist/ 2>/dev/null || true
ls .whl .mnist
