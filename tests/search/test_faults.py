"""A failed trial: its reason on one terminal line, its traceback as an MLflow artifact, its reason in Optuna."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.tracking import MlflowClient

from search.faults import ERROR_ARTIFACT, error_reason
from search.searcher import RungScheduler
from search.tracking import MlflowTrialCallback, SearchRun
from space.config import SearchSpace

RAY_TRACEBACK = """Failure # 1 (occurred at 2026-11-29_17-00-00)
ray::ImplicitFunc.train() (pid=123, ip=127.0.0.1, actor_id=abc)
  File "/work/main/trials/run.py", line 275, in run_trial
    raise FloatingPointError(f"loss is {loss.item()} at step {step} (learning rate too high?)")
FloatingPointError: loss is nan at step 7 (learning rate too high?)
"""


def test_the_reason_is_the_exception_line_of_the_traceback():
    assert error_reason(RAY_TRACEBACK) == "FloatingPointError: loss is nan at step 7 (learning rate too high?)"
    oom = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB\n"
    assert error_reason(oom) == "torch.OutOfMemoryError: CUDA out of memory. Tried 2 GiB"
    assert error_reason("") == "unknown error"
    assert error_reason("worker died\n") == "worker died"


class _Searcher:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def note_error(self, trial_id: str, reason: str) -> None:
        self.errors.append((trial_id, reason))


def test_the_scheduler_hands_the_reason_to_the_searcher_before_ray_completes_the_trial(tmp_path):
    error_file = tmp_path / "error.txt"
    error_file.write_text(RAY_TRACEBACK)
    searcher = _Searcher()
    scheduler = RungScheduler(searcher)  # type: ignore[arg-type]
    scheduler.on_trial_error(None, SimpleNamespace(trial_id="t1", error_file=str(error_file), error_msg=None))
    assert searcher.errors == [("t1", "FloatingPointError: loss is nan at step 7 (learning rate too high?)")]


def _callback_with_trial_run(tmp_path):
    """A search run on sqlite, its MLflow callback (printing into ``lines``) and the run of trial 1 (Ray id t1)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = SearchSpace.model_validate({"search": {"num_trials": 4}})
    search = SearchRun(uri, "exp", tmp_path / "artifacts", "s", space, "")
    lines: list[str] = []
    callback = MlflowTrialCallback(search, space, echo=lines.append)
    run_id = callback.search.client.create_run(search.experiment_id, run_name="trial-001").info.run_id
    callback.run_ids["t1"], callback.numbers["t1"] = run_id, 1
    return uri, callback, lines, run_id


def test_a_failed_trial_gets_one_line_a_tag_an_error_artifact_and_its_reason_in_optuna(tmp_path):
    uri, callback, lines, run_id = _callback_with_trial_run(tmp_path)
    error_file = tmp_path / "error.txt"
    error_file.write_text(RAY_TRACEBACK)
    trial = SimpleNamespace(trial_id="t1", error_file=str(error_file), error_msg=None,
                            config={"phase": "search"}, last_result={})
    callback.on_trial_error(0, [], trial)
    reason = "FloatingPointError: loss is nan at step 7 (learning rate too high?)"
    assert lines == [f"[  1/4] failed    {reason} (traceback: {ERROR_ARTIFACT} of MLflow run {run_id})"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mps.error"] == reason and run.data.tags["mps.status"] == "failed"
    assert run.info.status == "FAILED"
    logged = MlflowClient(uri).download_artifacts(run_id, ERROR_ARTIFACT, str(tmp_path / "dl"))
    assert open(logged).read() == RAY_TRACEBACK


def test_an_error_of_the_trial_s_own_is_its_last_report_not_a_ray_error(monkeypatch):
    """Ray must not restart a trial whose own code raised (it would fail again): trainable reports the error."""
    from ray import tune

    import trials.run
    from search.faults import FAILED, TRACEBACK
    from search.run import trainable

    def diverges(cfg, report):
        raise FloatingPointError("loss is nan at step 7 (learning rate too high?)")

    reports: list[dict] = []
    monkeypatch.setattr(trials.run, "run_trial", diverges)
    monkeypatch.setattr(tune, "report", reports.append)
    from space.config import ModelSpec, TaskSpec, TrialConfig

    cfg = TrialConfig(model=ModelSpec(checkpoint="embedded"), task=TaskSpec(name="digits"))
    trainable({"trial": cfg.model_dump_json()})
    (report,) = reports
    assert report[FAILED] == "FloatingPointError: loss is nan at step 7 (learning rate too high?)"
    assert "Traceback" in report[TRACEBACK] and "in diverges" in report[TRACEBACK]


def test_a_failure_report_gets_one_line_a_tag_and_the_traceback_when_the_trial_completes(tmp_path):
    from search.faults import FAILED, TRACEBACK

    uri, callback, lines, run_id = _callback_with_trial_run(tmp_path)
    report = {FAILED: "torch.OutOfMemoryError: CUDA out of memory", TRACEBACK: "Traceback ...\nthe whole text\n"}
    trial = SimpleNamespace(trial_id="t1", config={"phase": "search"}, last_result=report)
    callback.on_trial_result(0, [], trial, report)
    assert lines == []  # said once, when the trial completes
    callback.on_trial_complete(0, [], trial)
    assert lines == [f"[  1/4] failed    torch.OutOfMemoryError: CUDA out of memory (traceback: {ERROR_ARTIFACT} of "
                     f"MLflow run {run_id})"]
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mps.status"] == "failed" and run.info.status == "FAILED"
    logged = MlflowClient(uri).download_artifacts(run_id, ERROR_ARTIFACT, str(tmp_path / "dl"))
    assert open(logged).read() == report[TRACEBACK]


def test_a_cuda_trial_s_final_report_tags_where_it_trained_and_its_kernel_path(tmp_path):
    from trials.report import DEVICE, FINISHED, KERNEL

    uri, callback, lines, run_id = _callback_with_trial_run(tmp_path)
    report = {FINISHED: True, "step": 8, "val_accuracy": 0.5, DEVICE: "cuda:0 NVIDIA H100 (CUDA_VISIBLE_DEVICES=0)",
              KERNEL: "torch: mamba-ssm cannot be imported"}
    trial = SimpleNamespace(trial_id="t1", config={"phase": "search"}, last_result=report)
    callback.on_trial_result(0, [], trial, report)
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["mps.device"] == report[DEVICE] and tags["mps.kernel"] == report[KERNEL]
    callback.on_trial_result(0, [], trial, report)  # a second trial with the same reason: tagged, not said again
    assert lines == ["note: [  1/4] ran the torch scan on CUDA, not mamba-ssm's fused kernel (mamba-ssm cannot be "
                     "imported); later trials with the same reason are tagged mps.kernel without this line"]
