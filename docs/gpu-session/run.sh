#!/bin/bash
# One call on the GPU machine (run from the repo root): install the carried packages, start the pretraining in the
# background, then the GPU tests (gpus_per_trial search included) and the method x architecture matrix.
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
t0=$(date +%s)
say() { echo "== $* ($(( $(date +%s) - t0 )) s)" | tee -a $LOG; }
say install
bash .gpu/install.sh >> $LOG 2>&1 || { tail -40 $LOG; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L | tee -a $LOG
python3 -c "import torch, transformers, ray, optuna, mlflow; print(torch.__version__, torch.cuda.get_device_name(0), transformers.__version__, ray.__version__, optuna.__version__, mlflow.__version__)" 2>&1 | tee -a $LOG
say pretrain start
( bash .gpu/pretrain.sh > $OUT/pretrain.log 2>&1; echo "pretrain rc=$?" >> $OUT/pretrain.log ) &
PRE=$!
say gpu tests
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rA tests/trials tests/benchmarks tests/search/test_end_to_end.py > $OUT/tests.log 2>&1
echo "pytest rc=$?" >> $OUT/tests.log
tail -25 $OUT/tests.log
say matrix
timeout 130 python3 -m benchmarks.gpu --matrix --device cuda --steps 2 --out $OUT/matrix.txt > $OUT/matrix.log 2>&1
echo "matrix rc=$?" | tee -a $OUT/matrix.log
tail -12 $OUT/matrix.log
say wait pretrain
wait $PRE
tail -6 $OUT/pretrain.log
[ -d $OUT/small-packages ] && tar -C $OUT -cf $OUT/small-packages.tar small-packages && rm -rf $OUT/small-packages
say done
ls -la $OUT
