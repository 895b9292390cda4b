#!/bin/bash
# Strip an unpacked ray 2.60.0 wheel tree ($1) down to what a local Ray Tune run loads.
set -euo pipefail
cd "$1"
rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/serve ray/llm ray/tune/examples ray/train/examples \
       ray/data/examples ray/util/dask ray/util/spark ray/util/joblib\
       ray/util/collective/examples
find . -name '*.map' -delete
find . -name '__pycache__' -prune -exec rm -rf {} +
# symbol tables only (dynamic symbols stay): shrinks the raylet/gcs binaries and _raylet.so
strip --strip-unneeded ray/_raylet.so
strip --strip-all ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
