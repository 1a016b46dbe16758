#!/usr/bin/env bash
# Creates the two virtual environments that benchmarks/peers/run.py uses:
#
#   .venv-torch  torch 2.13.0 (CPU) + torchdiffeq 0.2.5
#   .venv-jax    tools/jax-venv.sh's (keras-node on the JAX backend, which
#                CI's tests use) + diffrax + optax, whatever versions pip
#                gives
#
# at the repository root (gitignored by `/.venv*/`). A venv that already
# exists is kept and only gets what it lacks; .venv-jax is made by
# `tools/jax-venv.sh` (with the system's packages, which it requires of a
# .venv-jax it keeps), so the two scripts run in either order. Prints the
# installed versions at the end.
#
# torch is pinned to exactly 2.13.0: an unpinned `pip install torch` from
# PyPI fetches the multi-GB CUDA build. Point pip at the CPU wheel, e.g.
# PIP_FIND_LINKS=/path/to/wheels or
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, if it is not
# already configured.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"

make_venv() {  # make_venv DIR PACKAGE...
    local dir="$ROOT/$1"
    shift
    if [[ ! -x "$dir/bin/python" ]]; then
        "$PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install --upgrade pip
    fi
    "$dir/bin/python" -m pip install "$@"
}

make_venv .venv-torch torch==2.13.0 torchdiffeq==0.2.5
PYTHON="$PYTHON" bash "$ROOT/tools/jax-venv.sh"
"$ROOT/.venv-jax/bin/python" -m pip install jax diffrax optax

"$ROOT/.venv-torch/bin/python" -c \
    'import torch, torchdiffeq; print("torch", torch.__version__, "torchdiffeq", torchdiffeq.__version__)'
"$ROOT/.venv-jax/bin/python" -c \
    'import jax, jaxlib, diffrax, equinox, optax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "diffrax", diffrax.__version__, "equinox", equinox.__version__, "optax", optax.__version__)'
