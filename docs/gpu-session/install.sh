#!/bin/bash
# Installs the carried packages (site<TAG>.tar.xz: transformers 5.24, huggingface_hub 2.4, optuna, mlflow, ...;
# ray<TAG>.tar.xz: ray 2.60.0 stripped of Java, the web UI, rllib, serve, llm) into $SITE (default /tmp/site).
# Idempotent: it rebuilds $SITE from the archives each time. Fails loudly (set -e, import check).
#   bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD
# TAG defaults to the running python's (312 on the GPU machine); SITE and PYTHON can be overridden.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}
TAG=${TAG:-$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')}
for a in "site$TAG.tar.xz" "ray$TAG.tar.xz"; do
  [ -f "$HERE/$a" ] || { echo "install.sh: FAILED: missing $HERE/$a (python tag $TAG)" >&2; exit 1; }
done
rm -rf "$SITE.tmp"; mkdir -p "$SITE.tmp"
"$PY" - "$HERE" "$TAG" "$SITE.tmp" <<'PYEOF'
import sys, tarfile, time
here, tag, dest = sys.argv[1:]
t0 = time.time()
for name in (f"site{tag}.tar.xz", f"ray{tag}.tar.xz"):
    with tarfile.open(f"{here}/{name}") as t:
        t.extractall(dest, filter="tar")
print(f"install.sh: unpacked into {dest} in {time.time() - t0:.1f} s")
PYEOF
rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"
for b in "$SITE/ray/core/src/ray/gcs/gcs_server" "$SITE/ray/core/src/ray/raylet/raylet"; do
  [ -x "$b" ] || { echo "install.sh: FAILED: $b not executable" >&2; exit 1; }
done

# Every carried distribution's requirements, checked against what this python sees with $SITE first.
# Informative: mlflow's server-only requirements (Flask, gunicorn, docker, ...) are expected to be absent.
PYTHONPATH="$SITE" "$PY" - "$SITE" <<'PYEOF' || true
import sys
from importlib import metadata
from packaging.requirements import Requirement
site = sys.argv[1]
expected_absent = {"flask", "flask-cors", "docker", "graphene", "gunicorn", "huey", "cryptography", "skops",
                   "fastapi", "starlette", "uvicorn", "gitpython", "databricks-sdk", "python-dotenv", "waitress",
                   "httpx2-jsfetch", "tomli", "async-timeout", "google-auth"}
problems = []
for d in metadata.distributions(path=[site]):
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        try:
            v = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            if name not in expected_absent:
                problems.append(f"{d.metadata['Name']} needs {r}: not installed")
            continue
        if req.specifier and not req.specifier.contains(v, prereleases=True):
            problems.append(f"{d.metadata['Name']} needs {r}: found {v}")
print("install.sh: requirement check:", "clean" if not problems else "PROBLEMS (read on)")
for p in problems:
    print("  REQUIREMENT PROBLEM:", p)
PYEOF

PYTHONPATH="$SITE" "$PY" - "$SITE" <<'PYEOF'
import sys
site = sys.argv[1]
import ray, ray.tune, ray.train, optuna, mlflow, sqlalchemy, alembic, transformers, huggingface_hub, mambapy
import pydantic, tokenizers, safetensors, torch
from ray.tune.search import Searcher
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from transformers import MambaConfig, MambaForCausalLM, Mamba2Config
from mambapy.pscan import pscan
want = {"ray": "2.60.0", "optuna": "5.0.0", "mlflow": "3.17.2", "sqlalchemy": "2.1.9", "transformers": "5.24.0",
        "huggingface_hub": "2.4.0", "pydantic": "2.14.4"}
bad = []
for m in (ray, optuna, mlflow, sqlalchemy, alembic, transformers, huggingface_hub, pydantic, tokenizers,
          safetensors, torch):
    name = m.__name__
    print(f"  {name:16s} {m.__version__:14s} {m.__file__}")
    if name in want and (m.__version__ != want[name] or not m.__file__.startswith(site)):
        bad.append(name)
if bad:
    sys.exit(f"install.sh: FAILED: wrong version or location: {bad}")
print("install.sh: OK. Use:  export PYTHONPATH=" + site + ":$PWD")
PYEOF
