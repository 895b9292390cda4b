from __future__ import annotations

from benchmarks.scan import main, model_flops, predicted_seconds, summary


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
    main(["--configs", "tiny", "--lengths", "16", "--threads", "1", "--paths", "ours", "mambapy", "--reps", "1",
          "--json", str(out)])
    text = capsys.readouterr().out
    assert "tiny L=16" in text and "mambapy/ours" in text and "ours/bound" in text
    assert out.exists()


def test_method_benchmark_prints_every_method_against_full_fine_tuning(capsys):
    from benchmarks.methods import main as methods_main

    methods_main(["--configs", "tiny", "--methods", "lora_in_proj", "parallel_adapter", "--length", "16",
                  "--batch", "4", "--reps", "1"])
    text = capsys.readouterr().out
    assert "full fine-tuning" in text
    for method in ("lora_in_proj", "parallel_adapter"):
        line = next(ln for ln in text.splitlines() if ln.startswith(method))
        assert "error" not in line and "%" in line
