from __future__ import annotations

import json

from benchmarks.scan import format_mamba2_row, main, model_flops, predicted_seconds, summary


def test_flop_bound_grows_linearly_with_length():
    assert model_flops("tiny", 1024) == 4 * model_flops("tiny", 256)
    assert model_flops("small", 64) > model_flops("tiny", 64)


def test_default_loop_is_predicted_quadratic_and_other_paths_linear():
    assert predicted_seconds("hf_loop", (64, 1.0), 256) == 16.0
    assert predicted_seconds("mambapy", (64, 1.0), 256) == 4.0
    assert predicted_seconds("ours", None, 256) == 0.0


def test_summary_flags_a_missed_target():
    rows = [{"config": "tiny", "L": 256, "threads": 1, "bound_ms": 10.0,
             "ours": {"ms": 100.0, "peak_mb": 50.0}, "mambapy": {"ms": 200.0, "peak_mb": 100.0}}]
    text = summary(rows)
    assert "mambapy/ours 2.0x (MISSES >= 3.0x)" in text
    assert "memory ours/mambapy 0.50 (meets <= 1)" in text


def test_benchmark_runs_every_path_side_by_side(capsys, tmp_path):
    out = tmp_path / "bench.json"
    main(["--sections", "mamba1", "--configs", "tiny", "--lengths", "16", "--threads", "1", "--paths", "ours",
          "mambapy", "--reps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "tiny L=16" in text and "mambapy/ours" in text and "ours/bound" in text
    assert out.exists()


def test_mamba2_section_times_transformers_torch_path_and_ours_side_by_side(capsys, tmp_path):
    out = tmp_path / "bench.json"
    main(["--sections", "mamba2", "--mamba2-configs", "tiny", "--lengths", "16", "--mamba2-reps", "1",
          "--json", str(out)])
    text = capsys.readouterr().out
    assert "Mamba-2" in text and "tiny L=16" in text and "hf_torch/ours" in text
    (row,) = json.loads(out.read_text())
    assert row["section"] == "mamba2" and row["hf_torch"]["ms"] > 0 and row["ours"]["ms"] > 0


def test_mamba2_row_flags_a_missed_target():
    row = {"config": "tiny", "L": 256, "threads": 1, "hf_torch": {"ms": 150.0, "min_ms": 140.0},
           "ours": {"ms": 100.0, "min_ms": 90.0}}
    assert "hf_torch/ours 1.50x (MISSES >= 2.0x)" in format_mamba2_row(row)
    row["ours"] = {"ms": 50.0, "min_ms": 45.0}
    assert "hf_torch/ours 3.00x (meets >= 2.0x)" in format_mamba2_row(row)


def test_method_benchmark_prints_every_method_against_full_fine_tuning(capsys):
    from benchmarks.methods import main as methods_main

    methods_main(["--configs", "tiny", "--methods", "lora_in_proj", "parallel_adapter", "--length", "16",
                  "--batch", "4", "--reps", "1"])
    text = capsys.readouterr().out
    assert "full fine-tuning" in text
    for method in ("lora_in_proj", "parallel_adapter"):
        line = next(ln for ln in text.splitlines() if ln.startswith(method))
        assert "error" not in line and "%" in line
