from __future__ import annotations

import json

import torch

from space.config import TrialConfig
from tests.conftest import small_trial_yaml
from trials.run import evaluate
from trials.tasks.registry import load_task
from trials.trained import load_trained, train


def outputs(model, ids, lengths):
    with torch.no_grad():
        return model.eval()(ids, lengths)


def test_mergeable_trial_saves_adapter_and_merged_checkpoint_that_agree(tmp_path):
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods="lora_in_proj_x: {rank: 2, dora: true}\n  d_delta: {}"))
    metrics = train(cfg, tmp_path, steps=4, echo=lambda *_: None)
    assert metrics["merge_max_rel_error"] < 1e-5
    assert json.loads((tmp_path / "metrics.json").read_text())["steps_done"] == 4
    ids, lengths = torch.randint(259, 276, (4, 64)), torch.full((4,), 64)
    adapted, merged = load_trained(tmp_path), load_trained(tmp_path, merged=True)
    assert ((outputs(merged, ids, lengths) - outputs(adapted, ids, lengths)).abs().max()
            / outputs(adapted, ids, lengths).abs().max()) < 1e-5


def test_non_mergeable_trial_is_saved_as_an_adapter_that_reloads_exactly(tmp_path):
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods="parallel_adapter: {rank: 4}"))
    metrics = train(cfg, tmp_path, steps=4, echo=lambda *_: None)
    assert metrics["merge_max_rel_error"] is None and not (tmp_path / "merged").exists()
    reloaded = load_trained(tmp_path)
    data = load_task(cfg.task, cfg.model)
    assert evaluate(reloaded, data.val) == metrics["val_accuracy"]
