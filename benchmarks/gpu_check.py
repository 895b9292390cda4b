"""The GPU check, as two prepared commands for a lent GPU machine (``docs/gpu-session/README.md``). Each is useful
if the next never runs, and each writes its results as they come: one JSON line per step in ``OUT/<phase>.jsonl``,
the logs beside it.

    python -m benchmarks.gpu_check kernels --out OUT [--src .gpu/src] [--site /tmp/site] [--device cuda]
    python -m benchmarks.gpu_check matrix --out OUT [--device cuda]

``kernels`` (at most about 7 minutes): builds causal-conv1d, then mamba-ssm, from the carried source archives for
sm_90 only (``prepare`` made them so), each under its timeout and timed; says what ``trials.models.fused`` finds
then (the compiled pieces, or why not); and runs the GPU tests of the fused paths.
``matrix`` (at most about 4 minutes; on the torch path when the build failed): the method x architecture matrix
(``benchmarks.gpu --matrix``) and a search with two trials on one GPU (``search.gpus_per_trial: 0.5``).
``--device cpu`` is the dry run that CI takes: no build, the probe, the CPU tests of the same files, a small matrix
on the CPU, no search. Pretraining and its corpus are not part of the check.

    python -m benchmarks.gpu_check prepare --out .gpu/src     # here, with the registry: the source archives

``prepare`` downloads the source archives of the ``cuda`` extra's versions (``SOURCES``) and rewrites each
``setup.py`` to compile for sm_90 alone (upstream compiles for every architecture from sm_75 to sm_121, whatever
``TORCH_CUDA_ARCH_LIST`` says, which takes far longer than a lent machine gives).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The source archives the check builds, inside the cuda extra's ranges (pyproject.toml), causal-conv1d first
# (mamba-ssm imports its compiled functions).
SOURCES = ("causal-conv1d==1.6.1", "mamba-ssm==2.3.2.post1")
ARCH = "90"  # the H100 / H200 the project is lent
BUILD_TIMEOUT = {"causal_conv1d": 150, "mamba_ssm": 270}  # seconds
GPU_TEST_FILES = ("tests/trials/models/test_mamba2_gpu.py", "tests/trials/models/test_fused.py",
                  "tests/trials/methods/test_methods_gpu.py", "tests/trials/test_precision.py",
                  "tests/trials/tasks/test_wrappers.py")
GENCODE = re.compile(r'cc_flag\.append\("-gencode"\)\n(?P<indent>[ \t]*)'
                     r'cc_flag\.append\("arch=compute_(?P<arch>\d+)a?,code=sm_\d+a?"\)')


class Record:
    """``OUT/<phase>.jsonl``: one line per step, written and flushed as each ends, and a line on the terminal."""

    def __init__(self, out: Path, phase: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{phase}.jsonl"
        self.path.write_text("")
        self.t0 = time.time()

    def __call__(self, step: str, **fields: Any) -> dict[str, Any]:
        line = {"step": step, "at_s": round(time.time() - self.t0, 1), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        shown = {k: v for k, v in fields.items() if k != "tail"}
        print(f"== {step} ({line['at_s']} s): {json.dumps(shown)}", flush=True)
        return line


def run(cmd: Sequence[str], timeout: float, log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log``; its exit code (124 on timeout), seconds and the log's last lines."""
    t0 = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = log.read_text(errors="replace").splitlines()
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "tail": lines[-15:]}


def sm90_only(setup_py: str) -> tuple[str, list[str]]:
    """``setup.py`` with every ``-gencode`` pair but sm_90's turned into ``pass``; the architectures left out."""
    dropped: list[str] = []

    def keep_90(m: re.Match[str]) -> str:
        if m["arch"] == ARCH:
            return m.group(0)
        dropped.append(m["arch"])
        return f"pass  # sm_{m['arch']} left out for the GPU check\n{m['indent']}pass"

    patched = GENCODE.sub(keep_90, setup_py)
    if ARCH not in [m["arch"] for m in GENCODE.finditer(setup_py)]:
        raise ValueError(f"setup.py compiles no sm_{ARCH}: its -gencode lines changed upstream; look before building")
    return patched, dropped


def rewrite_sdist(src: Path, dest: Path) -> list[str]:
    """Copy the source archive ``src`` to ``dest`` with its top-level ``setup.py`` made sm_90-only."""
    dropped: list[str] = []
    with tarfile.open(src) as tin, tarfile.open(dest, "w:gz") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.count("/") == 1 and member.name.endswith("/setup.py"):
                text, dropped = sm90_only(data.decode())
                data = text.encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data) if data is not None else None)
    return dropped


def prepare(out: Path) -> None:
    """Download ``SOURCES`` (source archives, no dependencies) and write them sm_90-only to ``out``."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    # Metadata is read with this environment's torch and no CUDA build (an isolated build would pull a CUDA torch).
    env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"}
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "--no-build-isolation", "-d", str(raw), *SOURCES], check=True, env=env)
    for archive in sorted(raw.glob("*.tar.gz")):
        dropped = rewrite_sdist(archive, out / archive.name)
        print(f"{out / archive.name}: sm_{ARCH} only (left out: {', '.join(f'sm_{a}' for a in dropped)})")


def build(record: Record, src: Path, site: Path, out: Path) -> None:
    """Build and install causal-conv1d, then mamba-ssm, into ``site`` (on PYTHONPATH), each timed."""
    env = {"TORCH_CUDA_ARCH_LIST": "9.0", "MAMBA_FORCE_BUILD": "TRUE", "CAUSAL_CONV1D_FORCE_BUILD": "TRUE",
           "MAX_JOBS": str(os.cpu_count() or 8), "NVCC_THREADS": "2"}
    for name, seconds in BUILD_TIMEOUT.items():
        archives = sorted(src.glob(f"{name}-*.tar.gz"))
        if not archives:
            record(f"build {name}", rc=None, error=f"no {name}-*.tar.gz in {src} (run prepare first)")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(site), "--upgrade", str(archives[-1])]
        record(f"build {name}", archive=archives[-1].name, **run(cmd, seconds, out / f"build-{name}.log", env))


def probe(record: Record) -> bool:
    """What ``trials.models.fused`` finds, in a fresh interpreter (it sees what was just installed)."""
    code = ("import json; from trials.models import fused; "
            "print(json.dumps({k: p()[1] or 'found' for k, p in "
            "(('mamba1', fused.mamba1_kernel), ('mamba2', fused.mamba2_kernel))}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-800:]}
    record("probe", **found)
    return all(v == "found" for v in found.values())


def pytest(record: Record, step: str, marker: str, files: Sequence[str], timeout: float, out: Path,
           extra: Sequence[str] = ()) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", "-m", marker,
           *extra, *files]
    record(step, **run(cmd, timeout, out / f"{step.replace(' ', '-')}.log"))


def kernels(out: Path, src: Path, site: Path, device: str) -> None:
    record = Record(out, "kernels")
    if device == "cuda":
        build(record, src, site, out)
    else:
        record("build", rc=None, skipped="dry run on the CPU: nothing to compile")
    fused = probe(record)
    if device == "cuda":
        pytest(record, "gpu tests", "gpu", GPU_TEST_FILES, 200, out)
    else:
        pytest(record, "cpu tests", "not gpu", ("tests/trials/models/test_fused.py",), 200, out)
    record("done", fused_kernels=fused)


def matrix(out: Path, device: str) -> None:
    record = Record(out, "matrix")
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--matrix", "--device", device, "--out", str(out / "matrix.txt")]
    if device == "cuda":
        cmd += ["--steps", "2"]
    else:  # a smoke test of the loop: two architectures, one method, one step
        cmd += ["--archs", "mamba", "mamba2", "--methods", "lora_in_proj", "--steps", "1"]
    record("matrix", **run(cmd, 150 if device == "cuda" else 120, out / "matrix.log"))
    if device == "cuda":
        pytest(record, "two trials per gpu", "gpu", ("tests/search/test_end_to_end.py",), 150, out,
               extra=("-k", "half_a_gpu"))
    else:
        record("two trials per gpu", rc=None, skipped="dry run on the CPU: the search needs a GPU to share")
    record("done")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("prepare", "kernels", "matrix"))
    p.add_argument("--out", type=Path, required=True, help="where results go ($OUT on the GPU machine)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the dry run")
    p.add_argument("--src", type=Path, default=Path(".gpu/src"), help="kernels: the prepared source archives")
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="kernels: where the builds are installed")
    a = p.parse_args(argv)
    if a.phase == "prepare":
        prepare(a.out)
    elif a.phase == "kernels":
        kernels(a.out, a.src, a.site, a.device)
    else:
        matrix(a.out, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
