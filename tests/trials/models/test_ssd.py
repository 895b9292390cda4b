"""The chunked SSD scan (trials.models.ssd) against transformers' Mamba-2 torch scan and a sequential loop."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from trials.models.ssd import FACTORED_SPAN, discretize_dt, reference_scan, ssd_scan

# transformers' own torch function, even where mamba-ssm replaces it with a CUDA kernel
TRANSFORMERS_SCAN = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)
H, P, N = 8, 8, 4


def inputs(length: int, groups: int, batch: int = 2, seed: int = 0, dt_scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, length, H, P, generator=g),
        "dt_raw": torch.randn(batch, length, H, generator=g) * dt_scale,
        "A": -torch.rand(H, generator=g) * 4 - 0.5,
        "B": torch.randn(batch, length, groups, N, generator=g),
        "C": torch.randn(batch, length, groups, N, generator=g),
        "D": torch.randn(H, generator=g),
        "dt_bias": torch.randn(H, generator=g),
        "h0": torch.randn(batch, H, P, N, generator=g),
    }


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> bool:
    """fp32 agreement relative to the larger magnitude (the scans sum in different orders)."""
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("length", [1, 7, 8, 37, 64, 100])
@pytest.mark.parametrize("groups", [8, 2])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("factored", [True, False])
def test_ssd_matches_transformers_torch_scan_for_any_length(length, groups, with_h0, factored):
    t = inputs(length, groups)
    h0 = t["h0"] if with_h0 else None
    want, want_final = TRANSFORMERS_SCAN(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], chunk_size=8, D=t["D"],
                                         dt_bias=t["dt_bias"], dt_softplus=True, initial_states=h0,
                                         return_final_states=True)
    y, final = ssd_scan(t["x"], discretize_dt(t["dt_raw"], t["dt_bias"]), t["A"], t["B"], t["C"], t["D"], h0,
                        chunk_size=16, factored=factored)
    assert y.shape == (2, length, H, P) and final.shape == (2, H, P, N)
    assert close(y, want) and close(final, want_final)


@pytest.mark.parametrize("factored", [True, False])
def test_ssd_gradients_match_the_sequential_scan(factored):
    t = inputs(21, 2, seed=1)
    names = ("x", "dt_raw", "A", "B", "C", "D", "dt_bias", "h0")

    def grads(scan):
        leaves = {k: t[k].clone().requires_grad_() for k in names}
        dt = discretize_dt(leaves["dt_raw"], leaves["dt_bias"])
        y, final = scan(leaves["x"], dt, leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["h0"])
        (y.square().mean() + final.square().mean()).backward()
        return {k: v.grad for k, v in leaves.items()}

    want = grads(reference_scan)
    got = grads(lambda *a: ssd_scan(*a, chunk_size=8, factored=factored))
    for k in names:
        assert close(got[k], want[k], 1e-4), k


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_the_chunk_size_changes_only_the_rounding(chunk):
    t = inputs(50, 8, seed=2)
    dt = discretize_dt(t["dt_raw"], t["dt_bias"])
    want, want_final = reference_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"], t["h0"])
    y, final = ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"], t["h0"], chunk_size=chunk)
    assert close(y, want) and close(final, want_final)


def test_scanning_a_split_sequence_from_the_first_parts_final_state_equals_scanning_it_whole():
    t = inputs(45, 2, seed=3)
    dt = discretize_dt(t["dt_raw"], t["dt_bias"])
    whole, whole_final = ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"])
    cut = 19
    _, mid_state = ssd_scan(t["x"][:, :cut], dt[:, :cut], t["A"], t["B"][:, :cut], t["C"][:, :cut], t["D"])
    second, final = ssd_scan(t["x"][:, cut:], dt[:, cut:], t["A"], t["B"][:, cut:], t["C"][:, cut:], t["D"],
                             initial_state=mid_state)
    assert close(second, whole[:, cut:]) and close(final, whole_final)


def test_a_chunk_with_a_large_log_decay_takes_the_stable_form():
    # dt of about 25 per step with A near -4: a 16-step chunk decays by ~1600, far beyond FACTORED_SPAN, where the
    # factored form's exp(+-span/2) overflows fp32.
    t = inputs(32, 2, seed=4)
    dt = discretize_dt(t["dt_raw"].abs() + 25.0, t["dt_bias"])
    assert float(-(dt * t["A"]).sum(1).max()) > FACTORED_SPAN
    want, _ = reference_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"])
    y, _ = ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"], chunk_size=16)
    forced, _ = ssd_scan(t["x"], dt, t["A"], t["B"], t["C"], t["D"], chunk_size=16, factored=True)
    assert torch.isfinite(y).all() and close(y, want)
    assert not torch.isfinite(forced).all()  # why the check exists


def test_dt_is_clamped_to_the_time_step_limit():
    dt = discretize_dt(torch.tensor([[[-30.0, 0.0, 30.0]]]), torch.zeros(3), limit=(0.01, 2.0))  # [1, 1, 3]
    assert torch.allclose(dt, torch.tensor([[[0.01, 0.6931472, 2.0]]]))


def test_mismatched_shapes_are_named():
    t = inputs(8, 3 if H % 3 else 2)
    with pytest.raises(ValueError, match=r"B \(2, 8, 3, 4\)"):
        ssd_scan(t["x"], t["dt_raw"], t["A"], t["B"], t["C"])


def test_off_the_cpu_the_scan_never_reads_its_data_to_choose_a_form(monkeypatch):
    """On an accelerator a data-dependent choice would make the host wait once per layer and forward: on meta
    tensors (which have no data to read; autocast, which knows no meta device, is a no-op here) the scan runs
    through."""
    import contextlib

    from trials.models.ssd import ssd_scan

    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    bt, length, h, p, g, n = 2, 20, 4, 3, 2, 5
    meta = {"device": "meta"}
    y, state = ssd_scan(torch.empty(bt, length, h, p, **meta), torch.empty(bt, length, h, **meta),
                        -torch.ones(h, **meta), torch.empty(bt, length, g, n, **meta),
                        torch.empty(bt, length, g, n, **meta), chunk_size=8)
    assert y.shape == (bt, length, h, p) and state.shape == (bt, h, p, n)
