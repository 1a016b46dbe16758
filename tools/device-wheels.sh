#!/usr/bin/env bash
# Fetches into .whl/ the wheels that the borrowed GPU machines lack for
# benchmarks/gpu_device.sh (their image has JAX with CUDA and Python 3.12,
# no Keras, no TFP), Keras and TFP at the versions tested (pyproject.toml's
# tfp-nightly, the Keras of the results); .whl/requirements.txt names them
# for the device scripts' install. .whl/ stays out of git; the device tool
# carries it. Also copies the MNIST files into .mnist/ and writes the commit
# (and whether tracked files differ from it) to .whl/commit.json, where
# benchmarks/machine.py finds it on a machine whose copy has no .git: run
# this right before the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(keras==3.15.1 tfp-nightly==0.26.0.dev20261027)
# The MNIST files too, for a machine without the shared folder.
mkdir -p .mnist
cp -n ../shared/data/mnist/*.gz .mnist/ 2>/dev/null || true
for name in train-images-idx3 train-labels-idx1 t10k-images-idx3 \
            t10k-labels-idx1; do
    if [[ ! -s .mnist/$name-ubyte.gz ]]; then
        echo "tools/device-wheels.sh: no .mnist/$name-ubyte.gz: put the" \
             "four MNIST .gz files in ../shared/data/mnist (or .mnist)" >&2
        exit 1
    fi
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl \
    "${PINS[@]}" namex optree decorator gast dm-tree
printf '%s\n' "${PINS[@]}" > .whl/requirements.txt
commit=$(git rev-parse HEAD)
status=$(git status --porcelain --untracked-files=no)
dirty=false
[[ -z $status ]] || dirty=true
printf '{"git_commit": "%s", "git_dirty": %s}\n' "$commit" "$dirty" \
    > .whl/commit.json
ls .whl .mnist
