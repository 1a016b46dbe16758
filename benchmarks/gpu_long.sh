#!/usr/bin/env bash
# The long MNIST recipe on a borrowed GPU, several runs at once on the one
# GPU (each is too small to fill it): benchmarks/gpu_jax.py --long, seeds 0
# and 1 with the kinetic-energy regulariser (1e-4) and seed 0 without.
# Prepare here with `bash tools/device-wheels.sh`, then run through the
# device tool with carry [".whl", ".mnist"]:
#     bash benchmarks/gpu_long.sh
# Each run writes its log (per-epoch test accuracy as it comes) and its JSON
# to $OUT, also when the time limit kills it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -m pip install --quiet --no-index --find-links .whl \
    keras tfp-nightly >> "$OUT/gpu.txt" 2>&1
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
run() {  # run NAME OPTION...
    local name=$1
    shift
    timeout "${RUN_TIMEOUT:-500}" python3 benchmarks/gpu_jax.py \
        --manual-dir .mnist --long --json-out "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1
    echo "$name exit $?" >> "$OUT/$name.log"
}
run ke-s0 --seed 0 --kinetic-energy 1e-4 &
run ke-s1 --seed 1 --kinetic-energy 1e-4 &
run base-s0 --seed 0 &
wait
for name in ke-s0 ke-s1 base-s0; do
    grep -E "^epoch|exit|Error" "$OUT/$name.log" | tail -n 12
    grep -E '"(test_accuracy|train_s|median_step_s|nfe_forward_test_batch)"' \
        "$OUT/$name.json"
done
