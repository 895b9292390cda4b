from __future__ import annotations

import pytest

from space.methods import METHOD_SPACES
from trials.methods.registry import supported


@pytest.mark.parametrize("method", [m for m in METHOD_SPACES if supported(m, "mamba") is None])
def test_every_method_runs_in_the_benchmark_with_its_default_config(method):
    from benchmarks.methods import run_case

    out = run_case("tiny", method, length=8, batch=2, threads=1, reps=1)
    assert out["params"] > 0 and out["ms"] > 0
