#!/usr/bin/env bash
# Makes .venv-jax: keras-node on Keras' JAX backend. TFP's JAX substrate needs
# tfp-nightly, which cannot share an environment with the TensorFlow
# backend's tensorflow-probability. The environment sees the system's
# packages (TensorFlow and tfds for the example's tf.data pipeline, installed
# by `pip install -e ".[test]"`); its own tfp-nightly comes first on the path.
# Idempotent; benchmarks/peers/setup.sh calls it and adds the peers. $PYTHON
# (default python3) makes the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! grep -qs "include-system-site-packages = true" .venv-jax/pyvenv.cfg; then
    rm -rf .venv-jax
    "${PYTHON:-python3}" -m venv --system-site-packages .venv-jax
fi
.venv-jax/bin/pip install --quiet --disable-pip-version-check \
    -e ".[jax]" scipy pytest
