#!/bin/bash
# The second call (4 minutes at most), on the machine the first left warm; on a fresh one the packages are installed
# again and the build is gone, so the matrix runs on the torch path (kernels.jsonl of the first call says why):
#   run(command="bash .gpu/matrix.sh 2>&1", carry=[".gpu"], timeout_s=250)
# The method x architecture matrix against the CPU, then a search with two trials on one GPU. Results in
# $OUT/matrix.jsonl as they come, matrix.txt and the logs beside it.
set -u
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/ray ]; then
  bash .gpu/install.sh > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 3; }
fi
export PYTHONPATH=/tmp/site:$PWD
timeout 235 python3 -m benchmarks.gpu_check matrix --out "$OUT"
echo "matrix rc=$?"
