"""The GPU check's two commands, dry-run on the CPU as CI can (each step recorded as it ends), and the sm_90-only
rewrite of the carried build scripts."""

from __future__ import annotations

import ast
import io
import json
import tarfile

from benchmarks.gpu_check import main, rewrite_sdist, sm90_only

UPSTREAM_SHAPE = '''
cc_flag = []
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= Version("12.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
'''


def steps(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_kernels_dry_run_records_the_probe_and_the_cpu_tests_of_the_fused_path(tmp_path):
    assert main(["kernels", "--device", "cpu", "--out", str(tmp_path)]) == 0
    done = steps(tmp_path / "kernels.jsonl")
    assert [s["step"] for s in done] == ["build", "probe", "cpu tests", "done"]
    assert done[1]["mamba1"].startswith("mamba-ssm cannot be imported")  # no mamba-ssm here: the reason, not a crash
    assert done[2]["rc"] == 0 and any("passed" in line for line in done[2]["tail"])
    assert done[3]["fused_kernels"] is False


def test_the_matrix_dry_run_runs_the_matrix_loop_on_the_cpu(tmp_path):
    assert main(["matrix", "--device", "cpu", "--out", str(tmp_path)]) == 0
    done = steps(tmp_path / "matrix.jsonl")
    assert [s["step"] for s in done] == ["matrix", "two trials per gpu", "done"]
    assert done[0]["rc"] == 0 and (tmp_path / "matrix.txt").exists()


def test_the_build_scripts_are_rewritten_to_compile_for_sm_90_alone(tmp_path):
    patched, dropped = sm90_only(UPSTREAM_SHAPE)
    assert dropped == ["80", "100"] and "compute_90,code=sm_90" in patched and "compute_80" not in patched
    ast.parse(patched)  # still Python, every block still has a body
    src = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(src, "w:gz") as t:
        for name, text in (("pkg-1.0/setup.py", UPSTREAM_SHAPE), ("pkg-1.0/csrc/kernel.cu", "// unchanged\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    assert rewrite_sdist(src, tmp_path / "out.tar.gz") == ["80", "100"]
    with tarfile.open(tmp_path / "out.tar.gz") as t:
        assert t.extractfile("pkg-1.0/setup.py").read().decode() == patched
        assert t.extractfile("pkg-1.0/csrc/kernel.cu").read() == b"// unchanged\n"


def test_the_makefile_unpacks_the_sources_the_gpu_check_builds():
    """The reference-swap tests read the same mamba-ssm and causal-conv1d as the GPU check compiles."""
    import re

    from benchmarks.gpu_check import SOURCES
    from tests.conftest import REPO

    makefile = (REPO / "Makefile").read_text()
    found = re.search(r"^MAMBA_REF_SOURCES := (.+)$", makefile, re.M)
    assert found is not None and sorted(found.group(1).split()) == sorted(SOURCES)
