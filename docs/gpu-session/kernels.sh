#!/bin/bash
# The first call on a lent GPU machine (7 minutes at most), from the repository root with .gpu carried:
#   run(command="bash .gpu/kernels.sh 2>&1", carry=[".gpu"], timeout_s=470)
# Installs the carried packages, builds causal-conv1d and mamba-ssm for sm_90 from .gpu/src (each under a timeout,
# timed), says what trials.models.fused finds, and runs the GPU tests of the fused paths. Every step lands in
# $OUT/kernels.jsonl as it ends, its log beside it.
set -u
export PYTHONUNBUFFERED=1
bash .gpu/install.sh > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L > "$OUT/gpu.txt" 2>&1; nvcc --version | tail -1 >> "$OUT/gpu.txt" 2>&1
timeout 440 python3 -m benchmarks.gpu_check kernels --out "$OUT" --src .gpu/src --site /tmp/site
echo "kernels rc=$?"
