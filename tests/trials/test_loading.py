"""Loading a checkpoint is never silent: another architecture, or weights that do not fit, stop before training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BambaConfig, BambaForCausalLM, MambaConfig, MambaForCausalLM

from space.config import ModelSpec, TaskSpec
from trials.model import CheckpointError, load_base_model
from trials.probe import Probe


@pytest.fixture(scope="module")
def bamba_dir(tmp_path_factory):
    """A small random Bamba (Mamba-2 + attention hybrid) saved by transformers' own save_pretrained."""
    torch.manual_seed(0)
    cfg = BambaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, mamba_n_heads=2, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1,
                      attn_layer_indices=[1], mamba_chunk_size=16)
    path = tmp_path_factory.mktemp("bamba")
    BambaForCausalLM(cfg).save_pretrained(path)
    return path


def mamba_dir(path, edit):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=300, hidden_size=32, state_size=4, num_hidden_layers=2)
    MambaForCausalLM(cfg).save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_another_architecture_is_refused_naming_what_it_is_and_what_is_supported(bamba_dir):
    with pytest.raises(CheckpointError, match=r"is a 'bamba' model \(BambaForCausalLM\); supported: MambaForCausalLM"):
        load_base_model(str(bamba_dir))


def test_missing_and_unexpected_weights_are_named_not_initialised(tmp_path):
    def edit(w):
        del w["backbone.layers.1.mixer.D"]
        w["backbone.layers.0.mixer.extra"] = torch.zeros(3)

    path = mamba_dir(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_base_model(str(path))
    assert "1 missing weight(s): backbone.layers.1.mixer.D" in str(err.value)
    assert "1 unexpected weight(s): backbone.layers.0.mixer.extra" in str(err.value)


def test_a_weight_of_another_shape_is_named(tmp_path):
    path = mamba_dir(tmp_path, lambda w: w.update({"backbone.layers.1.mixer.D": torch.zeros(7)}))
    said = r"1 mismatched weight\(s\): backbone.layers.1.mixer.D \(checkpoint \[7\], model \[64\]\)"
    with pytest.raises(CheckpointError, match=said):
        load_base_model(str(path))


def test_a_checkpoint_that_fits_loads_its_own_weights(tmp_path):
    path = mamba_dir(tmp_path, lambda w: None)
    saved = load_file(path / "model.safetensors")
    lm = load_base_model(str(path))
    state = lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # copied, not computed: exact


def test_the_search_probe_opens_the_checkpoint_before_any_trial(bamba_dir, tmp_path):
    with pytest.raises(CheckpointError, match="'bamba' model"):
        Probe(ModelSpec(checkpoint=str(bamba_dir)), TaskSpec(name="digits"))
    broken = mamba_dir(tmp_path, lambda w: w.pop("backbone.norm_f.weight"))
    with pytest.raises(CheckpointError, match="missing weight"):
        Probe(ModelSpec(checkpoint=str(broken)), TaskSpec(name="digits"))
