#!/usr/bin/env bash
# The GPU runs on a borrowed machine (JAX with CUDA, PyTorch, torchdiffeq and
# diffrax, no TensorFlow, no network). Prepare here with
# `bash tools/device-wheels.sh`, then run through the device tool with carry
# [".whl", ".mnist"]:
#     bash benchmarks/gpu_device.sh [PART ...]    # default: peers epoch
# peers:   benchmarks/peers/run.py --gpu: ours (Keras' JAX backend),
#          torchdiffeq (CUDA) and diffrax (JAX), the same train step on the
#          same GPU (time limit PEERS_TIMEOUT, 240 s);
# epoch:   benchmarks/gpu_jax.py: one epoch of the MNIST classifier on the
#          GPU (GPU_TIMEOUT, 200 s);
# solvers: benchmarks/peers/run.py --gpu --solver-table: every solver and
#          gradient method of ours against the peers' (SOLVERS_TIMEOUT,
#          420 s; 15 runs, each compiling).
# Everything goes to $OUT as it comes, also when a time limit kills a part:
# pip's log, each peer's JSON line, JAX's compile log (each compilation and
# its duration), the per-10-iteration progress and the final JSONs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
PARTS=${*:-peers epoch}
for part in $PARTS; do
    case $part in
        peers | epoch | solvers) ;;
        *) echo "unknown part '$part': use peers, epoch or solvers" >&2
           exit 2 ;;
    esac
done
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -m pip install --quiet --no-index --find-links .whl \
    -r .whl/requirements.txt > "$OUT/pip.txt" 2>&1
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
for part in $PARTS; do
    case $part in
    peers)
        timeout "${PEERS_TIMEOUT:-240}" python3 -m benchmarks.peers.run \
            --gpu --rounds 1 --steps 20 --warmup 3 \
            --peers torchdiffeq diffrax-backsolve-stock diffrax-recursive-stock \
            --json-out "$OUT/peers.json" > /dev/null 2> "$OUT/peers.txt"
        echo "peers exit $?" >> "$OUT/peers.txt"
        grep -v "^[IWE]0000" "$OUT/peers.txt" | cut -c1-400 ;;
    solvers)
        timeout "${SOLVERS_TIMEOUT:-420}" python3 -m benchmarks.peers.run \
            --gpu --solver-table --rounds 1 --steps 20 --warmup 3 \
            --json-out "$OUT/solvers.json" > "$OUT/solvers_table.txt" \
            2> "$OUT/solvers.txt"
        echo "solvers exit $?" >> "$OUT/solvers.txt"
        grep -v "^[IWE]0000" "$OUT/solvers.txt" | cut -c1-300
        sed -n '/^{/q;p' "$OUT/solvers_table.txt" ;;  # the table, not the JSON
    epoch)
        JAX_LOG_COMPILES=1 timeout "${GPU_TIMEOUT:-200}" \
            python3 -m benchmarks.gpu_jax --manual-dir .mnist \
            --json-out "$OUT/gpu_jax.json" \
            --progress-file "$OUT/progress.txt" > "$OUT/stdout.txt" \
            2> "$OUT/stderr.txt"
        echo "epoch exit $?" >> "$OUT/progress.txt"
        tail -n 30 "$OUT/progress.txt" "$OUT/stdout.txt"
        # The compilations that took over half a second.
        grep -h "Finished XLA compilation" "$OUT/stderr.txt" \
            | awk '$(NF-1) > 0.5'
        grep -c "Finished XLA compilation" "$OUT/stderr.txt" ;;
    esac
done
