"""The method x architecture matrix of benchmarks.gpu: on CPU (the loop builds and runs every case, and flags a
mismatch), and on CUDA (marked ``gpu``: the fused path against the CPU path, skipped without a device)."""

from __future__ import annotations

import pytest
import torch

import benchmarks.gpu as gpu
from benchmarks.gpu import KernelWatch, compare, main, matrix_methods, path_taken, run_matrix, watched_kernels

# Methods that take every path of the mixers: a weight delta (parametrised in_proj), a per-head tensor, SDT's
# seeded selection, a larger state, a hook the fused kernel takes (initial state) and hooks it cannot.
SAMPLE = ["lora_in_proj", "a_log_delta", "sdt", "additional_scan", "initial_state", "parallel_adapter"]


def test_matrix_runs_every_sampled_method_on_cpu_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "matrix.txt"
    rows = run_matrix("cpu", archs=["mamba", "bamba"], methods=SAMPLE, length=16, batch=2, steps=1, out=out)
    assert sorted((r["arch"], r["method"]) for r in rows) == sorted((a, m) for a in ("mamba", "bamba") for m in SAMPLE)
    for row in rows:
        assert "error" not in row, row
        assert row["out_err"] <= 1e-5 and row["grad_err"] <= 1e-5 and row["params"] > 0
        assert row["fused_ms"] > 0 and row["torch_ms"] > 0 and row["path"] == "cpu"
    text = out.read_text()
    assert "12 cases run, 0 mismatches" in text and "bamba             sdt" in text
    assert text.strip() in capsys.readouterr().out.replace("\r", "")


def test_matrix_covers_exactly_the_supported_methods_of_each_architecture():
    from trials.methods.registry import REGISTRY, supported

    assert "lora_x_proj" in matrix_methods("mamba") and "lora_x_proj" not in matrix_methods("mamba2")
    assert "initial_state" not in matrix_methods("falcon_h1")  # its mixer is transformers' own
    assert matrix_methods("nemotron_h") == [m for m in REGISTRY if supported(m, "nemotron_h") is None]


def test_matrix_flags_a_device_model_that_differs_from_the_cpu_model(monkeypatch, capsys):
    built = []
    adapted_tiny = gpu.adapted_tiny

    def second_copy_differs(model_type, method, seed):
        built.append(model_type)
        return adapted_tiny(model_type, method, seed + (len(built) % 2 == 0))

    monkeypatch.setattr(gpu, "adapted_tiny", second_copy_differs)
    (row,) = run_matrix("cpu", archs=["mamba2"], methods=["lora_out_proj"], length=8, batch=2, steps=1)
    assert row["out_err"] > 1e-3 and row["grad_err"] > 1e-3
    assert "MISMATCH" in capsys.readouterr().out


def test_the_command_exits_non_zero_when_a_case_fails(monkeypatch):
    def broken(*args):
        raise RuntimeError("broken")

    monkeypatch.setattr(gpu, "adapted_tiny", broken)
    with pytest.raises(SystemExit, match="1 of 1 cases mismatched or failed"):
        main(["--matrix", "--device", "cpu", "--archs", "mamba", "--methods", "d_delta", "--steps", "1"])


def test_gradient_error_is_relative_to_each_tensor_floored_by_the_largest():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen)
    big, tiny = torch.randn(4, generator=gen), 1e-9 * torch.randn(4, generator=gen)
    # float noise on a nearly-zero gradient is not a mismatch; the same noise on the large gradient is measured
    out_err, grad_err = compare((logits, [big, tiny]), (logits, [big, tiny + 1e-7]))
    assert out_err == 0 and grad_err < 1e-3
    _, grad_err = compare((logits, [big, tiny]), (logits, [big * 1.1, tiny]))
    assert 0.09 < grad_err < 0.11
    _, grad_err = compare((logits, [big, None]), (logits, [big, tiny]))
    assert grad_err == float("inf")


def test_watched_kernels_counts_fused_calls_withholds_them_for_the_torch_path_and_collects_fallbacks(monkeypatch):
    import trials.models.fused as fused_paths
    import trials.models.mamba1_mixer as mamba1_mixer
    import trials.models.mamba2_mixer as mamba2_mixer

    monkeypatch.setattr(mamba2_mixer, "_fused_kernel", lambda: lambda x: x + 1)
    monkeypatch.setattr(mamba1_mixer, "_cuda_kernels", lambda: lambda x: x * 2)
    said = "FastBambaMixer runs the torch scan on CUDA, not mamba-ssm's fused kernel: of a test"
    fused_paths.choose("FastBambaMixer", (None, "of a test"), [])  # warned before: still seen
    with watched_kernels(fused=True) as watch:
        assert mamba2_mixer._fused_kernel()(1) == 2 and mamba1_mixer._cuda_kernels()(3) == 6
        fused_paths.choose("FastBambaMixer", (None, "of a test"), [])
    assert watch.calls == 2 and watch.messages == [said]
    with watched_kernels(fused=False) as watch:
        assert mamba2_mixer._fused_kernel() is None and mamba1_mixer._cuda_kernels() is None
    assert mamba2_mixer._fused_kernel()(1) == 2  # restored


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_architecture_matches_the_cpu_path_and_lora_runs_the_fused_kernel(tmp_path):
    from trials.models.mamba2_mixer import _fused_kernel

    rows = run_matrix("cuda", methods=SAMPLE, length=64, batch=2, steps=2, out=tmp_path / "matrix.txt")
    bad = [r for r in rows if not gpu.row_ok(r, gpu.TOLERANCE["cuda"])]
    assert not bad, bad
    assert all(r["fused_mb"] > 0 and r["torch_mb"] > 0 for r in rows)
    if _fused_kernel() is not None:
        by_case = {(r["arch"], r["method"]): r for r in rows}
        for arch in ("mamba", "mamba2", "bamba", "granitemoehybrid", "nemotron_h"):
            assert by_case[(arch, "lora_in_proj")]["path"] == "fused", by_case[(arch, "lora_in_proj")]
        assert by_case[("mamba2", "parallel_adapter")]["path"] == "torch"
        assert "parallel_adapter" in by_case[("mamba2", "parallel_adapter")]["reason"]


def test_path_names_the_fused_kernel_a_fallback_and_its_reason():
    from trials.models.fixtures import tiny_model
    from trials.models.loading import use_scan

    mamba2 = use_scan(tiny_model("mamba2"), "auto")
    said = ["FastMamba2Mixer runs the torch scan on CUDA, not mamba-ssm's fused kernel: the fused kernel cannot "
            "apply parallel_adapter"]
    assert path_taken(mamba2, KernelWatch(calls=4), "cuda") == ("fused", "")
    assert path_taken(mamba2, KernelWatch(calls=0, messages=said), "cuda") == ("torch", said[0])
    assert path_taken(mamba2, KernelWatch(calls=2, messages=said), "cuda")[0] == "partly fused"
    assert path_taken(mamba2, KernelWatch(calls=4), "cpu") == ("cpu", "")
    assert path_taken(use_scan(tiny_model("falcon_h1"), "auto"), KernelWatch(), "cuda")[0] == "transformers"
    mamba = use_scan(tiny_model("mamba"), "auto")  # Mamba-1's mixer says why through the same logger
    said = ["FastMambaMixer runs the torch scan on CUDA, not mamba-ssm's fused kernel: mamba-ssm cannot be imported"]
    assert path_taken(mamba, KernelWatch(messages=said), "cuda") == ("torch", said[0])