"""The overhead benchmark runs a real search and compares its wall time with its trials' own times."""

from __future__ import annotations

import re

import pytest

from benchmarks.overhead import main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overhead_benchmark_prints_both_times_and_their_ratio(capsys):
    assert main(["--trials", "2", "--steps", "4", "--concurrency", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 trials, each" in out
    wall, ideal = map(float, re.search(r"search: ([\d.]+) s; trials' own time / concurrency 2: ([\d.]+) s", out)
                      .groups())  # type: ignore[union-attr]
    ratio = float(re.search(r"overhead_ratio \(wall / ideal - 1\): (-?[\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < ideal < wall and ratio == pytest.approx(wall / ideal - 1, abs=0.005)  # times printed to 1 ms
