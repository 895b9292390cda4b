#!/bin/bash
# Build .gpu/ (ignored by git), the bundle one device call carries (`carry: [".gpu"]`), from the repository root:
#   bash docs/gpu-session/build.sh [312]     # the GPU machine's Python (3.12); 311 builds a copy for a local check
# It downloads cp$V wheels of pkgs.txt and ray 2.60.0 (the versions of requirements.lock), installs them with
# --target into one tree (mlflow's web UI removed) and strips Ray (strip_ray.sh), each packed as tar.xz; writes the
# source archives of causal-conv1d and mamba-ssm, made to compile for sm_90 alone, to .gpu/src
# (python -m benchmarks.gpu_check prepare); and copies the scripts beside them. About 40 MB in all.
set -euo pipefail
V=${1:-312}
REPO=$(pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/gpuprep}
OUTDIR="$REPO/.gpu"
grep -qx '/.gpu/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$REPO/.git/info/exclude"
mkdir -p "$WORK/w$V" "$OUTDIR"
cd "$WORK"
PLAT="--implementation cp --python-version ${V:0:1}.${V:1} --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:"
python3 -m pip download -q --no-deps $PLAT -d "w$V" -r "$HERE/pkgs.txt" ray==2.60.0 2>&1 | grep -v 'is ignored' || true
rm -rf "site$V"; mkdir "site$V"
python3 -m pip install -q --no-deps --no-compile $PLAT --target "site$V" -r "$HERE/pkgs.txt" 2>&1 | grep -v 'is ignored' || true
rm -rf "site$V/bin" "site$V/mlflow/server/js"
find "site$V" -name '__pycache__' -prune -exec rm -rf {} +
(cd "site$V" && tar cf - --sort=name . | xz -9 -T1 > "$OUTDIR/site$V.tar.xz")
rm -rf "ray$V"; mkdir "ray$V"; (cd "ray$V" && unzip -q ../"w$V"/ray-2.60.0-cp$V-*.whl)
bash "$HERE/strip_ray.sh" "ray$V"
(cd "ray$V" && tar cf - --sort=name . | xz -9 -T1 > "$OUTDIR/ray$V.tar.xz")
cp "$HERE"/{install.sh,kernels.sh,matrix.sh,check_stack.py} "$OUTDIR/"
cd "$REPO"
.venv/bin/python -m benchmarks.gpu_check prepare --out .gpu/src
du -sh "$OUTDIR"; ls -la "$OUTDIR"
