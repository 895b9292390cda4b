"""A real search on a Mamba-2 and on a Mamba-2/attention hybrid through Ray Tune, Optuna and MLflow, then export,
training of the chosen trial, and its merged checkpoint reloaded as the architecture it came from."""

from __future__ import annotations

import pytest
import torch

from search import results
from search.export import main as export_main
from search.run import main as search_main
from tests.search.test_end_to_end import check_search_and_export
from trials.models.fixtures import write_fixture
from trials.models.loading import load_base_model
from trials.train import main as train_main
from trials.trained import load_trained

SPACES = {
    # Weight deltas on in_proj's blocks and the per-head tensors, and a hook method (initial state) the project's
    # Mamba-2 mixer honours.
    "mamba2": """
model: {{checkpoint: {checkpoint}}}
methods:
  lora_in_proj_b: {{enabled: search, rank: 2}}
  lora_in_proj_x: {{enabled: search, rank: 2}}
  dt_bias_delta: {{enabled: search}}
  initial_state: {{enabled: search}}""",
    # The SSM side and the attention side of a hybrid, searched together.
    "bamba": """
model: {{checkpoint: {checkpoint}}}
methods:
  lora_in_proj: {{enabled: search, rank: 2}}
  a_log_delta: {{enabled: search}}
  lora_attn_q: {{enabled: search, rank: 2}}
  lora_mlp_up: {{enabled: search, rank: 2}}""",
}
COMMON = """
task: {{name: digits, shots_per_class: 2}}
training: {{budget: {{min_steps: 4, max_steps: 8, reduction_factor: 2}}, batch_size: 8,
           learning_rate: {{low: 0.001, high: 0.01, log: true}}}}
search: {{num_trials: 3, concurrency: 2, reevaluate: {{top: 0}}, results_dir: {results}}}
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["mamba2", "bamba"])
def test_a_search_on_the_architecture_trains_exports_and_merges_into_a_model_of_the_same_kind(arch, tmp_path):
    from transformers import AutoConfig

    checkpoint = "embedded-mamba2" if arch == "mamba2" else str(write_fixture("bamba", tmp_path / "tiny-bamba"))
    space = tmp_path / "space.yaml"
    space.write_text(SPACES[arch].format(checkpoint=checkpoint) + COMMON.format(results=tmp_path / "runs"))
    assert search_main([str(space)]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    check_search_and_export(tmp_path, uri, 3)
    c = results.client(uri)
    trial_runs = results.trials(c, "mamba-peft-search", results.latest_search(c, "mamba-peft-search")["run_id"])
    base = sum(p.numel() for p in load_base_model(checkpoint).parameters())
    assert {c.get_run(r).data.params["base_params"] for r in trial_runs.run_id} == {str(base)}  # every trial

    out = tmp_path / "trained"
    assert train_main([str(tmp_path / "best.yaml"), "--out", str(out)]) == 0
    ids = torch.randint(259, 276, (3, 32), generator=torch.Generator().manual_seed(0))
    lengths = torch.full((3,), 32)
    assert (out / "merged").exists() or arch == "mamba2"  # every bamba method is mergeable; initial_state is not
    with torch.no_grad():
        adapted = load_trained(out)(ids, lengths)
        if (out / "merged").exists():
            assert AutoConfig.from_pretrained(out / "merged").model_type == arch
            merged = load_trained(out, merged=True)(ids, lengths)
            assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-4
    assert export_main(["--tracking-uri", uri, "-o", str(tmp_path / "again.yaml")]) == 0
