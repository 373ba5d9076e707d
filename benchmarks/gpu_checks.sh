#!/usr/bin/env bash
# Every GPU check and timing of the project in one run of under ten minutes, for a lent H100/H200 (one call of the
# device tool: `bash benchmarks/gpu_checks.sh`, from the repository root). It uses the machine's own python3 and jax
# (0.11.2 with the CUDA plugin there) and needs nothing else from this repository's virtualenv.
#
# 1. attention_gpu.py: both of our GPU flash kernel sets (Triton; Mosaic GPU for Hopper) checked against the XLA
#    reference on the device, then timed against cuDNN, the XLA reference and jax's shipped kernels, T = 2K..32K.
# 2. train_gpu.py: the 1.8B bf16 train step (scanned, remat, 4K) with each kernel set, tokens/s and MFU.
# Logs and markdown tables land in $OUT (the device tool's folder) or ./gpu_out; copy the tables into
# benchmarks/RESULTS.md. A step that fails or times out does not stop the next.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/machine.txt" 2>&1

timeout 300 "$PY" benchmarks/attention_gpu.py --iters 3 --results "$OUT/attention.md" > "$OUT/attention.log" 2>&1
echo "attention_gpu.py exit $?" >> "$OUT/machine.txt"
for kernel in triton mosaic; do
  timeout 130 "$PY" benchmarks/train_gpu.py --gpu-flash-kernel "$kernel" --results "$OUT/train.md" \
    > "$OUT/train_$kernel.log" 2>&1
  echo "train_gpu.py --gpu-flash-kernel $kernel exit $?" >> "$OUT/machine.txt"
done
cat "$OUT/machine.txt"
tail -n 40 "$OUT/attention.log"
