#!/usr/bin/env bash
# The GPU run of benchmarks/gpu_jax.py on a borrowed machine (JAX with CUDA,
# no TensorFlow, no network). Prepare here with `bash tools/device-wheels.sh`,
# then run through the device tool with carry [".whl", ".mnist"]:
#     bash benchmarks/gpu_device.sh
# Everything it learns goes to $OUT, also when the time limit kills it:
# pip's log, JAX's compile log (each compilation and its duration), the
# per-10-iteration progress and the final JSON.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -m pip install --quiet --no-index --find-links .whl \
    keras tfp-nightly > "$OUT/pip.txt" 2>&1
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_LOG_COMPILES=1
timeout "${GPU_TIMEOUT:-420}" python3 benchmarks/gpu_jax.py \
    --manual-dir .mnist --json-out "$OUT/gpu_jax.json" \
    --progress-file "$OUT/progress.txt" > "$OUT/stdout.txt" \
    2> "$OUT/stderr.txt"
echo "exit $?" >> "$OUT/progress.txt"
tail -n 30 "$OUT/progress.txt" "$OUT/stdout.txt"
# The compilations that took over half a second.
grep -h "Finished XLA compilation" "$OUT/stderr.txt" | awk '$(NF-1) > 0.5'
grep -c "Finished XLA compilation" "$OUT/stderr.txt"
