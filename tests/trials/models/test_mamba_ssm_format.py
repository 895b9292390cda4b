"""Checkpoints in mamba-ssm's layout load as they are: detected from config.json, converted on load, with the
logits of their transformers twin; whatever does not fit is named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from trials.models.interface import CheckpointError
from trials.models.loading import load_base_model
from trials.models.mamba_ssm_format import is_mamba_ssm, to_transformers_config

VOCAB, PADDED = 281, 288  # mamba-ssm pads the embedding rows up to pad_vocab_size_multiple (16 here)


def twin(kind: str):
    """A tiny random transformers model, and the mamba-ssm config that describes the same model."""
    torch.manual_seed(0)
    if kind == "mamba1":
        cfg = MambaConfig(vocab_size=PADDED, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                          conv_kernel=3, time_step_rank=3)
        ssm = {"d_state": 4, "d_conv": 3, "expand": 2, "dt_rank": 3}
        return MambaForCausalLM(cfg).eval(), ssm
    cfg = Mamba2Config(vocab_size=PADDED, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2,
                       state_size=4, chunk_size=8, expand=2, conv_kernel=4, tie_word_embeddings=True)
    ssm = {"layer": "Mamba2", "d_state": 4, "d_conv": 4, "expand": 2, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    return Mamba2ForCausalLM(cfg).eval(), ssm


def write_mamba_ssm(path, lm, ssm_cfg, weights_file="pytorch_model.bin", edit=lambda w: None):
    """Save ``lm`` as state-spaces publishes checkpoints: mamba-ssm's config keys and weight names, the tied
    lm_head saved beside the embedding."""
    path.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, tensor in lm.state_dict().items():
        weights[name.replace("backbone.embeddings.", "backbone.embedding.")] = tensor.clone()
    weights["lm_head.weight"] = weights["backbone.embedding.weight"].clone()
    edit(weights)
    config = {"d_model": lm.config.hidden_size, "d_intermediate": 0, "n_layer": lm.config.num_hidden_layers,
              "vocab_size": VOCAB, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
              "tie_embeddings": True}
    (path / "config.json").write_text(json.dumps(config))
    if weights_file.endswith(".safetensors"):
        save_file(weights, path / weights_file, metadata={"format": "pt"})
    else:
        torch.save(weights, path / weights_file)
    return path


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_a_mamba_ssm_checkpoint_gives_the_logits_of_its_transformers_twin(tmp_path, kind, weights_file):
    lm, ssm = twin(kind)
    path = write_mamba_ssm(tmp_path / kind, lm, ssm, weights_file)
    assert is_mamba_ssm(path)
    loaded = load_base_model(str(path), scan="hf_loop").eval()
    assert type(loaded) is type(lm) and loaded.config.vocab_size == PADDED
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lm(input_ids=ids, use_cache=False).logits  # [2, 13, V]
        got = loaded(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_transformers_directory_is_not_taken_for_mamba_ssms(tmp_path):
    lm, _ = twin("mamba2")
    lm.save_pretrained(tmp_path)
    assert not is_mamba_ssm(tmp_path) and not is_mamba_ssm(tmp_path / "absent")


def test_missing_and_extra_weights_of_a_mamba_ssm_checkpoint_are_named(tmp_path):
    def edit(w):
        del w["backbone.layers.1.mixer.dt_bias"]
        w["backbone.layers.0.mixer.extra"] = torch.zeros(2)

    lm, ssm = twin("mamba2")
    path = write_mamba_ssm(tmp_path, lm, ssm, edit=edit)
    with pytest.raises(CheckpointError) as err:
        load_base_model(str(path))
    assert "1 missing weight(s): backbone.layers.1.mixer.dt_bias" in str(err.value)
    assert "1 unexpected weight(s): backbone.layers.0.mixer.extra" in str(err.value)


def test_a_mixer_of_another_shape_than_the_config_says_is_named(tmp_path):
    lm, ssm = twin("mamba2")
    path = write_mamba_ssm(tmp_path, lm, ssm | {"headdim": 4})  # 16 heads of 4: A_log [16], not [8]
    with pytest.raises(CheckpointError, match=r"mismatched weight\(s\): .*A_log \(checkpoint \[8\], model \[16\]\)"):
        load_base_model(str(path))


def test_an_untied_head_that_differs_from_the_embedding_is_refused_when_the_config_ties_them(tmp_path):
    lm, ssm = twin("mamba1")
    path = write_mamba_ssm(tmp_path, lm, ssm, edit=lambda w: w["lm_head.weight"].add_(1.0))
    with pytest.raises(CheckpointError, match="tie_embeddings is true but lm_head.weight is not"):
        load_base_model(str(path))


def test_state_spaces_mamba2_130m_config_maps_to_its_defaults():
    """The published config names only the layer; mamba-ssm's Mamba2 defaults fill in the rest."""
    raw = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    cfg = to_transformers_config(raw)
    assert isinstance(cfg, Mamba2Config)
    assert (cfg.vocab_size, cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.n_groups, cfg.chunk_size) == (
        50288, 24, 64, 128, 1, 256)
    assert (cfg.conv_kernel, cfg.expand, cfg.use_bias, cfg.use_conv_bias) == (4, 2, False, True)


def test_state_spaces_mamba_130m_config_maps_to_mamba1_defaults():
    raw = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    cfg = to_transformers_config(raw)
    assert isinstance(cfg, MambaConfig)
    assert (cfg.vocab_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel) == (50280, 16, 48, 4)


@pytest.mark.parametrize(("edit", "message"), [
    ({"d_intermediate": 128}, "d_intermediate: 128 adds an MLP"),
    ({"attn_layer_idx": [1]}, r"attn_layer_idx: \[1\] puts attention layers"),
    ({"rms_norm": False}, "rms_norm: false"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, "ssm_cfg.norm_before_gate: True"),
    ({"ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "ssm_cfg.D_has_hdim: True means D per channel"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 64}}, "ssm_cfg.d_ssm: 64 means an SSM over 64 of 128"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer: 'Mamba3' is not Mamba1 or Mamba2"),
    ({"ssm_cfg": {"d_state": 8, "typo": 1}}, "unknown Mamba1 option.s. typo"),
    ({"n_layers": 2}, r"unknown key\(s\) n_layers"),
])
def test_a_mamba_ssm_option_transformers_cannot_express_is_refused_by_name(edit, message):
    raw = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}} | edit
    with pytest.raises(CheckpointError, match=message):
        to_transformers_config(raw)
