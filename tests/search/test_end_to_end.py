"""A real search through Ray Tune, Optuna and MLflow, then export and training of the chosen trial."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch

from search import results
from search.export import main as export_main
from search.pruners import RUNG_ATTR
from search.run import main as search_main
from space.metrics import TRIAL_STATES
from trials.train import main as train_main
from trials.trained import load_trained

SPACE = """
name: e2e
model: {{checkpoint: embedded, pooling: {{choices: [last, mean]}}}}
task: {{name: digits, shots_per_class: 2}}
methods:
  lora_in_proj: {{enabled: search, rank: {{choices: [1, 2]}}}}
  a_log_delta: {{enabled: search}}
  d_delta: {{enabled: search}}
training: {{budget: {{min_steps: 2, max_steps: 8, reduction_factor: 2}}, batch_size: 8}}
search:
  num_trials: {trials}
  concurrency: {concurrency}
  pruner: {{name: pareto, min_peers: 2, min_better: 1, margin: 0.0}}
  reevaluate: {{top: 1, seeds: 1}}
  results_dir: {results}
{extra}
"""


def run_search(tmp_path, trials: int = 3, extra: str = "", concurrency: int = 2) -> str:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(trials=trials, results=tmp_path / "runs", extra=extra, concurrency=concurrency))
    assert search_main([str(space), "--quiet"]) == 0
    return str(space)


def check_search_and_export(tmp_path, uri: str, trials: int) -> None:
    c = results.client(uri)
    info = results.latest_search(c, "mamba-peft-search")
    assert info["status"] == results.STATUS_FINISHED
    df = results.trials(c, "mamba-peft-search", info["run_id"])
    searched = df[df.phase != results.REEVALUATE]
    assert len(searched) == trials
    assert set(df.status) <= set(TRIAL_STATES) - {"running", "interrupted"}
    finished = df[df.status == results.STATUS_FINISHED]
    assert not finished.empty and finished.test_accuracy.notna().all()
    for run_id in df[df.status.isin(["finished", "pruned"])].run_id:  # trained: a config and a curve
        assert results.trial_config_text(c, run_id).startswith("model:")
        assert c.get_metric_history(run_id, "val_accuracy")
    assert (df[df.phase == results.REEVALUATE].status == "finished").all()
    assert c.get_metric_history(info["run_id"], "hypervolume")

    best = tmp_path / "best.yaml"
    assert export_main(["--tracking-uri", uri, "-o", str(best)]) == 0
    front = results.pareto(df, ["val_accuracy", "trainable_params"])
    assert f"run {front.iloc[0].run_id}" in best.read_text().splitlines()[0]
    assert set(front.status) == {"finished"} and results.REEVALUATE not in set(front.phase)


def optuna_trials(storage: str, names: list[str]) -> list:
    import optuna

    return [t for name in names for t in optuna.load_study(study_name=name, storage=storage).trials]


@pytest.mark.slow
@pytest.mark.timeout(900)  # Ray's start, 8 trials one at a time, a re-evaluation, then a final training
def test_two_stage_search_with_pruning_logs_every_trial_then_export_and_train_the_best(tmp_path):
    extra = "  strategy: two_stage\n  stage1_trials: 4\n  study_name: e2e-study\n"
    run_search(tmp_path, trials=8, extra=extra, concurrency=1)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    check_search_and_export(tmp_path, uri, 8)

    c = results.client(uri)
    df = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
    assert set(df.phase) == {"stage1", "stage2", "reevaluate"}
    assert (df.phase == "stage1").sum() == 4 and (df.phase == "stage2").sum() == 4
    # Optuna and MLflow hold the same trials in the same words.
    studies = optuna_trials(f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}", ["e2e-study-stage1", "e2e-study-stage2"])
    assert len(studies) == 8
    by_number = {f"trial-{t.user_attrs['mps_number']:03d}": t for t in studies}
    for _, row in df[df.phase != results.REEVALUATE].iterrows():
        assert by_number[row.trial].user_attrs["mps_state"] == row.status
        if row.status in ("finished", "pruned"):
            assert by_number[row.trial].user_attrs[RUNG_ATTR]  # the rung values reached the study
    assert (df.status == "pruned").sum() >= 1  # margin 0 and min_better 1: a no-larger trial at least as good
    # Each finished trial's run says where it trained (search.gpus_per_trial's GPUs, or here the CPU).
    finished = df[df.status == "finished"]
    assert len(finished) and all(c.get_run(r).data.tags.get("mps.device") == "cpu" for r in finished.run_id)
    assert not any("mps.kernel" in c.get_run(r).data.tags for r in finished.run_id)  # no CUDA forward ran
    pruned = [t for t in studies if t.user_attrs["mps_state"] == "pruned"]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in pruned)

    out = tmp_path / "trained"
    assert train_main([str(tmp_path / "best.yaml"), "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "metrics.json").exists()

    assert json.loads((out / "metrics.json").read_text())["steps"] == 8  # the schedule the search ranked
    ids = torch.randint(259, 276, (3, 64))
    lengths = torch.full((3,), 64)
    with torch.no_grad():
        adapted = load_trained(out)(ids, lengths)
        if (out / "merged").exists():
            merged = load_trained(out, merged=True)(ids, lengths)
            assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-5


@pytest.mark.slow
@pytest.mark.timeout(600)  # Ray's start and one trial
def test_a_space_with_nothing_searched_trains_its_configuration_once(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(f"""
model: {{checkpoint: embedded}}
task: {{name: digits, shots_per_class: 2}}
methods: {{lora_in_proj: {{enabled: true, rank: 1}}}}
training: {{budget: {{min_steps: 2, max_steps: 4}}, batch_size: 8}}
search: {{num_trials: 12, reevaluate: {{top: 0}}, results_dir: {tmp_path / 'runs'}}}
""")
    assert search_main([str(space)]) == 0
    out = capsys.readouterr().out
    assert "nothing is searched" in out
    c = results.client(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    search_id = results.latest_search(c, "mamba-peft-search")["run_id"]
    df = results.trials(c, "mamba-peft-search", search_id)
    assert len(df) == 1 and list(df.status) == ["finished"]
    # The search ends with runnable commands for this store and this search: run the export one as printed.
    import shlex

    from search.export import main as export_main

    export = shlex.split(next(line for line in out.splitlines() if "-m search.export" in line).split("export:", 1)[1])
    assert export[:3] == [sys.executable, "-m", "search.export"] and search_id in export
    assert f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in export
    assert export_main([*export[3:-2], "-o", str(tmp_path / "best.yaml")]) == 0
    assert "lora_in_proj" in (tmp_path / "best.yaml").read_text()
    # Retrained with its seed on the search's schedule, the exported trial reaches the validation accuracy the search
    # measured through Ray (tests/search/test_training.py checks the training run, registry and reload in-process).
    assert train_main([str(tmp_path / "best.yaml"), "--out", str(tmp_path / "trained")]) == 0
    trained = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert trained["val_accuracy"] == pytest.approx(c.get_run(df.run_id[0]).data.metrics["val_accuracy"], abs=0.01)
    assert export_main([*export[3:-2], "--pick", "knee", "-o", str(tmp_path / "knee.yaml")]) == 0  # one trial
    capsys.readouterr()
    assert export_main([*export[3:-2], "--pick", "budget=10", "-o", str(tmp_path / "none.yaml")]) == 2
    assert "--pick budget=10: no Pareto trial" in capsys.readouterr().err and not (tmp_path / "none.yaml").exists()


def test_dry_run_prints_dimensions_sizes_and_cost_without_ray(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(trials=5, results=tmp_path / "runs", extra="  max_trainable: 3000",
                                  concurrency=2))
    assert search_main([str(space), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "149,312 parameters" in out and "10 classes" in out
    for name in ("lora_in_proj.enabled", "lora_in_proj.rank", "a_log_delta.enabled", "model.pooling"):
        assert f"  {name}: " in out
    assert "trainable parameters (closed form, head included" in out and "650 (0.44%)" in out
    assert "search.max_trainable 3,000:" in out and "would be rejected" in out
    assert "a training step takes" in out and "min of training" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_a_causal_lm_task_names_its_type_notes_truncation_and_times_a_median_configuration(tmp_path,
                                                                                                    capsys):
    space = tmp_path / "space.yaml"
    space.write_text("task: {name: stdlib_docstrings, max_length: 64}\n"
                     "methods: {lora_in_proj: {enabled: search}, a_log_delta: {enabled: search}}\n")
    assert search_main([str(space), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "task stdlib_docstrings (causal_lm)" in out and "classes" not in out
    assert "rows longer than max_length 64 were truncated" in out and "note: stdlib_docstrings.train" in out
    assert "closed form, no task head" in out and "0 (0.00%)" in out  # no method: the base model as it is
    step = out.split("a training step takes ")[1]
    assert not step.startswith("0 ms") and "nothing trained" not in step  # a median-size configuration trains


def test_end_of_search_table_fits_120_columns_whatever_the_methods():
    import pandas as pd

    from search.run import format_front

    methods = " + ".join(f"{name}(r=16)" for name in ("lora_in_proj", "lora_x_proj", "lora_out_proj", "lora_dt_proj",
                                                        "lora_embeddings", "prodial_in_proj", "parallel_adapter"))
    front = pd.DataFrame({"trial": ["trial-001", "trial-002"], "methods": [methods, "head only"],
                          "val_accuracy": [0.71, 0.5], "trainable_params": [1_234_567, 650],
                          "test_accuracy": [0.7, 0.49], "seeds": [3, 1], "val_accuracy_mean": [0.7, 0.5],
                          "val_accuracy_std": [0.01, float("nan")], "test_accuracy_mean": [0.69, 0.49],
                          "noise": ["", ""]})
    table = format_front(front, ["val_accuracy", "trainable_params"])
    assert max(len(line) for line in table.splitlines()) <= 120
    assert "0.700\u00b10.010" in table and "1,234,567" in table and "\u2026" in table


@pytest.mark.parametrize(("text", "message"), [
    ("\n", "space.yaml: the space is empty"),
    ("search: {{results_dir: {runs}}}\nmethods: {{lora_in_proj: {{rank: 0}}}}\n",
     "space.yaml: methods.lora_in_proj.rank: 0 is below 1"),
], ids=["empty", "invalid"])
def test_a_bad_space_exits_2_and_starts_nothing(tmp_path, text, message):
    space = tmp_path / "space.yaml"
    space.write_text(text.format(runs=tmp_path / "runs"))
    proc = subprocess.run([sys.executable, "-m", "search.run", str(space)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_export_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert export_main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "-o", str(tmp_path / "b.yaml")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "b.yaml").exists()


def test_train_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "best.yaml"
    bad.write_text("model: {}\ntask: {}\nmethods: {lora_in_proj: {rank: -1}}\ntraining: {}\n")
    assert train_main([str(bad)]) == 2
    assert "best.yaml: methods.lora_in_proj" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)  # Ray's start and 3 trials, two at a time
def test_search_with_optuna_and_mlflow_on_postgresql(tmp_path, postgres_stores):
    optuna_url, mlflow_url = postgres_stores
    extra = f"  optuna_storage: {optuna_url}\n  study_name: pg-study\ntracking: {{uri: '{mlflow_url}'}}\n"
    # `extra` continues the `search:` block, then opens `tracking:`
    run_search(tmp_path, trials=3, extra=extra)
    check_search_and_export(tmp_path, mlflow_url, 3)
    study = optuna.load_study(study_name="pg-study", storage=optuna_url)
    assert len(study.trials) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failing_trials_are_recorded_with_their_reason_and_max_failures_ends_the_search(tmp_path, capsys):
    import optuna
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(f"""
model: {{checkpoint: embedded}}
task: {{name: digits, shots_per_class: 2}}
methods: {{lora_in_proj: {{enabled: true, rank: {{choices: [1, 2, 4]}}}}}}
training: {{budget: {{min_steps: 2, max_steps: 4}}, batch_size: 8, learning_rate: 1.0e+8, grad_clip: 0}}
search: {{num_trials: 4, concurrency: 1, max_failures: 1, reevaluate: {{top: 0}}, results_dir: {tmp_path / 'runs'}}}
""")
    assert search_main([str(space)]) == 1  # nothing finished
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if " failed    " in line]
    assert len(failed) == 2 and all("FloatingPointError: loss is" in line for line in failed)
    assert all("(traceback: error.txt of MLflow run " in line for line in failed)
    assert "search.max_failures 1: 2 trials failed, so no more are started" in out
    assert "Traceback" not in out  # Ray's own tracebacks stay in its logs
    assert "Configuration for experiment" not in out and "View detailed results" not in out  # nor its banners
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    c = results.client(uri)
    df = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
    assert list(df.status) == ["failed", "failed"]
    for run_id in df.run_id:
        text = open(MlflowClient(uri).download_artifacts(run_id, "error.txt", str(tmp_path / run_id))).read()
        assert "FloatingPointError" in text
    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["mps_error"].startswith("FloatingPointError: loss is") for t in trials)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_space_and_seed_at_concurrency_one_repeat_the_same_search(tmp_path):
    """Reproducibility: the same configurations in the same order, with the same results (within float noise)."""
    def one(name: str):
        space = tmp_path / f"{name}.yaml"
        space.write_text(f"""
name: {name}
model: {{checkpoint: embedded, pooling: {{choices: [last, mean]}}}}
task: {{name: digits, shots_per_class: 2}}
methods: {{lora_in_proj: {{enabled: search, rank: {{choices: [1, 2]}}}}, a_log_delta: {{enabled: search}}}}
training: {{budget: {{min_steps: 2, max_steps: 4}}, batch_size: 8,
           learning_rate: {{low: 0.001, high: 0.01, log: true}}}}
search: {{num_trials: 5, concurrency: 1, seed: 7, reevaluate: {{top: 0}}, results_dir: {tmp_path / name}}}
""")
        assert search_main([str(space)]) == 0
        c = results.client(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        df = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
        params = sorted(col for col in df if col.startswith("param."))
        return df.sort_values("trial").reset_index(drop=True), params

    first, params = one("first")
    second, _ = one("second")
    assert list(first.status) == list(second.status) and len(first) == 5
    assert first[params].equals(second[params])  # the same configurations, proposal by proposal
    finished = first.status == "finished"
    assert finished.any()
    np.testing.assert_allclose(first.loc[finished, "val_accuracy"], second.loc[finished, "val_accuracy"], atol=1e-9)


def test_a_ray_address_nothing_answers_is_an_error_in_seconds(tmp_path, capsys):
    import socket
    import time

    from search.run import check_address

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        assert "cannot connect to 127.0.0.1" in (check_address(f"127.0.0.1:{port}") or "")
        s.listen()
        assert check_address(f"127.0.0.1:{port}") is None
        assert "Ray Client (ray://) is not supported" in (check_address(f"ray://127.0.0.1:{port}") or "")
    assert check_address("auto") is None and check_address(None) is None
    assert "expected host:port" in (check_address("headnode") or "")
    space = tmp_path / "space.yaml"
    space.write_text(f"search: {{results_dir: {tmp_path / 'runs'}}}\n")
    t0 = time.monotonic()
    assert search_main([str(space), "--address", f"127.0.0.1:{port}"]) == 2
    assert time.monotonic() - t0 < 60
    assert f"search.address '127.0.0.1:{port}': cannot connect" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing was started, no run left RUNNING
    assert not (tmp_path / "runs").exists()  # not even the probe
    assert search_main([str(space), "--address", "ray://head:10001"]) == 2
    assert ("ray start --address=head:6379 --num-cpus=0` (no trials here), then --address head:6379"
            in capsys.readouterr().out)


@pytest.mark.parametrize("cpus, gpus", [(1.0, 0.0), (2.0, 0.5), (1.0, 0.25), (4.0, 2.0)])
def test_each_trial_requests_its_cpus_and_gpu_fraction_from_ray(cpus, gpus):
    from ray import tune

    from search.run import trainable, trial_resources
    from space.config import SearchSpace

    space = SearchSpace.model_validate({"search": {"cpus_per_trial": cpus, "gpus_per_trial": gpus}})
    wrapped = tune.with_resources(trainable, trial_resources(space))
    bundle = wrapped._resources.required_resources  # what Ray reserves for each trial
    assert bundle.get("CPU") == cpus and bundle.get("GPU", 0.0) == gpus


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_a_gpu_each_puts_two_trials_on_one_gpu_at_once(tmp_path):
    """search.gpus_per_trial for real: 0.5 each, concurrency 2, one GPU. Each trial trains on CUDA on the GPU Ray
    gave it, the same one for all, and two trials' runs overlap in time (without a share, one would wait)."""
    extra = "  gpus_per_trial: 0.5\n  cpus_per_trial: 1\n"
    run_search(tmp_path, trials=4, extra=extra, concurrency=2)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    c = results.client(uri)
    df = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
    runs = [c.get_run(r) for r in df[df.status == "finished"].run_id]
    devices = {r.data.tags.get("mps.device") for r in runs}
    assert len(runs) >= 2 and len(devices) == 1 and next(iter(devices)).startswith("cuda:0 "), devices
    assert "CUDA_VISIBLE_DEVICES=" in next(iter(devices)) and "unset" not in next(iter(devices))
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:], strict=False)), spans  # two ran at once


def test_a_gpu_share_ray_cannot_schedule_is_an_error_naming_the_key():
    from space.config import SearchSpace

    with pytest.raises(ValueError, match=r"search.gpus_per_trial[\s\S]*1.5 GPUs: a trial takes a fraction"):
        SearchSpace.model_validate({"search": {"gpus_per_trial": 1.5}})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_method_the_architecture_lacks_is_refused_before_any_trial_naming_method_and_reason(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(f"""
model: {{checkpoint: embedded-mamba2}}
task: {{name: digits, shots_per_class: 2}}
methods: {{lora_in_proj: {{enabled: search}}, lora_x_proj: {{enabled: search}}, lora_dt_proj: {{enabled: false}}}}
training: {{budget: {{min_steps: 2, max_steps: 4}}, batch_size: 8}}
search: {{num_trials: 2, results_dir: {tmp_path / 'runs'}}}
""")
    assert search_main([str(space), "--dry-run"]) == 2
    dry = capsys.readouterr().out
    assert search_main([str(space)]) == 2
    out = capsys.readouterr().out
    for said in (dry, out):
        assert "methods.lora_x_proj: not supported on mamba2" in said and "in_proj" in said
        assert "lora_in_proj:" not in said and "lora_dt_proj" not in said  # supported, or not used
    assert " start " not in out
    c = results.client(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    with pytest.raises(results.ResultsError):
        results.latest_search(c, "mamba-peft-search")  # no search run was created


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_relative_data_paths_name_files_where_the_search_is_started_though_trials_run_elsewhere(tmp_path,
                                                                                                monkeypatch, capsys):
    """Ray Tune runs each trial in its own directory: a relative CSV path must still reach the user's file."""
    import csv

    data = tmp_path / "data"
    data.mkdir()
    words = {"GPL": "copyleft derivative source distribute", "MIT": "permission notice without warranty"}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        with open(data / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((f"{words[label]} {i}", label) for i in range(n) for label in words)
    (tmp_path / "space.yaml").write_text("""
model: {checkpoint: embedded}
task: {name: csv, files: {train: data/train.csv, validation: data/val.csv, test: data/test.csv}}
methods: {lora_in_proj: {enabled: true, rank: 1}}
training: {budget: {min_steps: 2, max_steps: 4}, batch_size: 4, learning_rate: {low: 0.001, high: 0.01}}
search: {num_trials: 2, concurrency: 2, reevaluate: {top: 0}, results_dir: runs,
         baselines: [full, {name: head, learning_rate: 0.01}]}
""")
    monkeypatch.chdir(tmp_path)
    assert search_main(["space.yaml"]) == 0
    out = capsys.readouterr().out
    # Each baseline says its learning rate, and whether it was its own or the searched range's middle.
    full, = [line for line in out.splitlines() if "  baseline: full fine-tuning " in line]
    head, = [line for line in out.splitlines() if "  baseline: head only " in line]
    assert "learning rate 0.0055 (the space's middle, not tuned for it" in full  # (0.001 + 0.01) / 2
    assert head.rstrip().endswith("learning rate 0.01")
    c = results.client(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    df = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
    assert list(df[df.phase != "baseline"].status) == ["finished", "finished"]
    assert str(data / "train.csv") in results.trial_config_text(c, df.run_id.iloc[0])  # the exported config too
