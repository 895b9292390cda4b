from __future__ import annotations

import json

import pytest

from space.config import TrialConfig
from tests.conftest import small_trial_yaml
from trials.models.loading import EMBEDDED_CHECKPOINTS, EMBEDDED_ENV, load_base_model, resolve_checkpoint
from trials.pretraining.pretrain import RECIPES
from trials.run import FINISHED, run_trial


@pytest.mark.parametrize("recipe", sorted(r for r in RECIPES if RECIPES[r]["checkpoint"] in EMBEDDED_CHECKPOINTS))
def test_each_embedded_checkpoint_is_its_recipes_huggingface_directory_with_a_card(recipe):
    r = RECIPES[recipe]
    path = EMBEDDED_CHECKPOINTS[r["checkpoint"]]
    assert path.name == r["name"]
    for name in ("config.json", "model.safetensors", "README.md", "pretrain.json"):
        assert (path / name).exists(), name
    card = (path / "README.md").read_text()
    assert "How it was made" in card and f"--recipe {recipe}" in card
    lm = load_base_model(r["checkpoint"])
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (r["hidden"], r["layers"])
    info = json.loads((path / "pretrain.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in lm.parameters()) and info["steps"] == r["steps"]


def test_a_path_is_passed_on_as_it_is_and_a_missing_one_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "my-mamba").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("./my-mamba") == "./my-mamba"
    assert resolve_checkpoint(str(tmp_path / "my-mamba")) == str(tmp_path / "my-mamba")
    assert resolve_checkpoint("state-spaces/mamba-130m-hf") == "state-spaces/mamba-130m-hf"  # a hub id
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_checkpoint("~/my-mamba") == str(tmp_path / "my-mamba")  # expanded, not taken for a repo id
    for missing in ("./no-such-model", str(tmp_path / "gone"), "../elsewhere/model"):
        with pytest.raises(FileNotFoundError, match=r"model\.checkpoint: '.*': no such directory \(/.*\); give a "
                                                    r"checkpoint directory, an embedded name \(embedded, "):
            resolve_checkpoint(missing)


def test_embedded_means_the_small_checkpoint_unless_the_environment_names_another(monkeypatch):
    monkeypatch.delenv(EMBEDDED_ENV, raising=False)
    assert resolve_checkpoint("embedded") == str(EMBEDDED_CHECKPOINTS["embedded-small"])
    assert resolve_checkpoint("embedded-tiny") == str(EMBEDDED_CHECKPOINTS["embedded-tiny"])
    monkeypatch.setenv(EMBEDDED_ENV, "embedded-tiny")
    assert resolve_checkpoint("embedded") == str(EMBEDDED_CHECKPOINTS["embedded-tiny"])
    monkeypatch.setenv(EMBEDDED_ENV, "embedded-huge")
    with pytest.raises(FileNotFoundError, match="MAMBA_PEFT_EMBEDDED=embedded-huge: no such embedded checkpoint"):
        resolve_checkpoint("embedded")


def test_trial_reports_validation_rounds_then_a_final_report_with_every_metric(small_trial):
    reports: list[dict] = []
    result = run_trial(small_trial, report=reports.append)
    assert [r["step"] for r in reports] == [3, 6]
    assert reports[0][FINISHED] is False and reports[-1][FINISHED] is True
    final = reports[-1]
    for key in ("val_accuracy", "test_accuracy", "trainable_params", "trainable_pct", "train_seconds",
                "peak_memory_mb", "steps_done", "status"):
        assert key in final, key
    assert final["status"] == "finished" and final["steps_done"] == 6
    assert final["device"] == "cpu" and "device" not in reports[0]  # where it trained, said once
    assert 0.0 <= result.val_accuracy <= 1.0 and 0.0 <= result.test_accuracy <= 1.0
    # 4 layers, D=64, E=128, N=16: LoRA r=2 -> 4*2*(64+256); A delta -> 4*128*16; head 64*10+10.
    assert result.method_params == {"lora_in_proj": 2560, "a_log_delta": 8192}
    assert result.trainable_params == 2560 + 8192 + 650


def test_trial_training_changes_only_the_trainable_tensors(small_trial):
    from trials.run import build_trial

    built = build_trial(small_trial)
    frozen = {n: p.detach().clone() for n, p in built.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    run_trial(small_trial, built=built)
    params = dict(built.model.named_parameters())
    assert all(params[n].equal(v) for n, v in frozen.items())
    assert all(not params[n].equal(v) for n, v in trained.items())


def test_head_only_trial_is_a_linear_probe(small_trial):
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods="{}"))
    assert run_trial(cfg).trainable_params == 650


def test_unknown_checkpoint_is_a_clear_error():
    cfg = TrialConfig.from_yaml(small_trial_yaml(checkpoint="/nonexistent/model"))
    with pytest.raises(FileNotFoundError, match=r"model.checkpoint: '/nonexistent/model': no such directory"):
        run_trial(cfg)


def test_peak_memory_window_restarts_for_each_trial():
    import torch

    from trials.run import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    big = torch.ones(64 * 2**20 // 4)  # 64 MB touched
    high = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 32


def test_evaluation_runs_on_the_project_scan_not_the_generation_cache_path(monkeypatch, small_trial):
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from trials.run import build_trial, evaluate

    built = build_trial(small_trial)

    def cached_path(*args, **kwargs):
        raise AssertionError("evaluation went through transformers' cached (step-by-step) path")

    monkeypatch.setattr(MambaMixer, "forward", cached_path)
    assert 0.0 <= evaluate(built.model, built.data.val) <= 1.0


@pytest.mark.parametrize("kind", ["full", "head"])
def test_a_baseline_trial_builds_with_the_closed_form_count_the_search_rejects_and_plots_by(kind):
    from space.config import TaskSpec, TrialConfig
    from trials.probe import Probe
    from trials.run import build_trial

    cfg = TrialConfig.model_validate({"model": {}, "task": {"name": "digits", "shots_per_class": 2},
                                      "baseline": kind})
    probe = Probe(cfg.model, TaskSpec(name="digits", shots_per_class=2))
    built = build_trial(cfg, probe.data)
    assert built.trainable_params == probe.trainable(cfg)
    assert built.trainable_params == (probe.base_params + 650 if kind == "full" else 650)


@pytest.mark.parametrize("interval", [1, 4])
def test_a_non_finite_loss_ends_the_trial_naming_the_first_step_it_appeared_at(interval, monkeypatch, small_trial):
    """On a CUDA device the loss is read every few steps (no host sync per step); the error still names the step."""
    import trials.run

    real_loss = trials.run.train_loss
    calls = []

    def goes_nan_at_step_2(model, batch, task):
        calls.append(1)
        loss = real_loss(model, batch, task)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(trials.run, "train_loss", goes_nan_at_step_2)
    monkeypatch.setattr(trials.run, "sync_interval", lambda device: interval)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 \(learning rate too high\?\)"):
        trials.run.run_trial(small_trial)
    assert len(calls) == (2 if interval == 1 else 3)  # read at step 2, or at step 3 (the first rung, eval_every 3)
