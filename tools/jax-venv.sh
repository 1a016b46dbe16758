#!/usr/bin/env bash
# Makes .venv-jax: keras-node on Keras' JAX backend. TFP's JAX substrate needs
# tfp-nightly, which cannot share an environment with the TensorFlow
# backend's tensorflow-probability. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-jax/bin/python ]; then
    python3 -m venv .venv-jax
fi
.venv-jax/bin/pip install --quiet --disable-pip-version-check \
    jax keras tfp-nightly numpy scipy pytest
.venv-jax/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
