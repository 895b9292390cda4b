#!/usr/bin/env bash
# Run on the GPU machine from the repository root, PYTHONPATH already set:  bash .gpu/pretrain.sh
# Trains recipe small-packages on the carried stdlib+packages corpus for as many steps as fit in 270 s
# (loading, timing, training and the validation pass), then writes $OUT/small-packages/ (config.json,
# model.safetensors, README.md, pretrain.json) and $OUT/pretrain.log.
set -euo pipefail
: "${OUT:?OUT must be set}"
mkdir -p "$OUT/small-packages"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/pretrain.log" || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/pretrain.log"
SCAN=$(python3 .gpu/pick_scan.py 2>> "$OUT/pretrain.log" | tail -1) || true
case "$SCAN" in torch|mambapy) ;; *) SCAN=auto ;; esac
echo "scan: $SCAN" | tee -a "$OUT/pretrain.log"
python3 -u -m trials.pretraining.pretrain --recipe small-packages --device cuda --max-seconds 250 --scan "$SCAN" \
    --corpus-file .gpu/corpus/stdlib+packages.xz --out "$OUT/small-packages" 2>&1 | tee -a "$OUT/pretrain.log"
ls -la "$OUT/small-packages" | tee -a "$OUT/pretrain.log"
