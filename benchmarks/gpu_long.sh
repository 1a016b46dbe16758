#!/usr/bin/env bash
# The long MNIST recipe on a borrowed GPU, several runs at once on the one
# GPU (each is too small to fill it): benchmarks/gpu_jax.py --long with each
# run's options. Prepare here with `bash tools/device-wheels.sh`, then run
# through the device tool with carry [".whl", ".mnist"]:
#     bash benchmarks/gpu_long.sh ["NAME:OPTIONS" ...]
# e.g. "ke-s2:--seed 2 --kinetic-energy 1e-4". Without arguments: the
# kinetic-energy recipe (1e-4) on seeds 0, 2 and 3 (seed 0 checks the JAX
# run against TensorFlow's 99.61%). Each run writes its log (per-epoch test
# accuracy as it comes) and its JSON to $OUT, also when the time limit
# kills it; $OUT brings back 8 files, so at most 3 runs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
    set -- "ke-s0:--seed 0 --kinetic-energy 1e-4" \
           "ke-s2:--seed 2 --kinetic-energy 1e-4" \
           "ke-s3:--seed 3 --kinetic-energy 1e-4"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -m pip install --quiet --no-index --find-links .whl \
    -r .whl/requirements.txt >> "$OUT/gpu.txt" 2>&1
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
names=()
for spec in "$@"; do
    name=${spec%%:*}
    names+=("$name")
    # shellcheck disable=SC2086  # the options are words
    timeout "${RUN_TIMEOUT:-500}" python3 -m benchmarks.gpu_jax \
        --manual-dir .mnist --long --json-out "$OUT/$name.json" \
        ${spec#*:} > "$OUT/$name.log" 2>&1 &
done
wait
for name in "${names[@]}"; do
    echo "== $name"
    grep -E "^epoch|Error" "$OUT/$name.log" | tail -n 12
    grep -E '"(test_accuracy|train_s|median_step_s|nfe_forward_test_batch)"' \
        "$OUT/$name.json"
done
