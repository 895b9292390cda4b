"""The typed mixer interface: each kind finds its mixers on every supported architecture, and its spec (blocks,
tensors, state shape, hooks) agrees with the modules it describes."""

from __future__ import annotations

import pytest
import torch
from transformers import Mamba2Config, MambaConfig, MambaForCausalLM

from tests.trials.methods.test_methods_mamba2 import BUILDERS, build
from trials.models.interface import HOOKS, ArchitectureError, ModelDims, architecture_of, mixer_kinds
from trials.models.loading import use_scan


def tiny_mamba1(scan: str = "torch") -> MambaForCausalLM:
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    return use_scan(MambaForCausalLM(cfg), scan)


EXPECTED_PATHS = {
    "mamba2": ["backbone.layers.0.mixer", "backbone.layers.1.mixer"],
    "bamba": ["model.layers.0.mamba", "model.layers.2.mamba"],  # attention at layers 1 and 3
    "granitemoehybrid": ["model.layers.0.mamba", "model.layers.2.mamba"],
    "falcon_h1": ["model.layers.0.mamba", "model.layers.1.mamba"],  # a mixer beside attention in every layer
    "nemotron_h": ["model.layers.0.mixer", "model.layers.2.mixer"],  # layer pattern: Mamba-2, attention, Mamba-2, MLP
}


@pytest.mark.parametrize("arch", list(EXPECTED_PATHS))
def test_mixer_kinds_finds_every_ssm_layer_and_only_those(arch):
    found = mixer_kinds(build(arch))
    assert [m.path for m in found] == EXPECTED_PATHS[arch]
    assert {m.spec.kind for m in found} == {"mamba2"}


def test_mamba1_mixers_are_found_with_their_blocks():
    found = mixer_kinds(tiny_mamba1())
    assert [m.path for m in found] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    spec = found[0].spec
    assert [(b.name, b.start, b.stop) for b in spec.projection("in_proj").blocks] == [("x", 0, 64), ("z", 64, 128)]
    assert [(b.name, b.start, b.stop) for b in spec.projection("x_proj").blocks] == [("dt", 0, 2), ("b", 2, 6),
                                                                                      ("c", 6, 10)]
    assert spec.state_shape == (64, 4)


@pytest.mark.parametrize("arch", ["mamba", *BUILDERS])
def test_the_spec_describes_the_modules_it_binds(arch):
    lm = tiny_mamba1() if arch == "mamba" else build(arch)
    for mixer in mixer_kinds(lm):
        for proj in mixer.spec.projections:
            linear = mixer.projection(proj.name)
            assert (linear.out_features, linear.in_features) == (proj.out_features, proj.in_features)
            if proj.blocks:  # the blocks tile the output rows in order, with no gap or overlap
                assert proj.blocks[0].start == 0 and proj.blocks[-1].stop == proj.out_features
                assert all(a.stop == b.start for a, b in zip(proj.blocks, proj.blocks[1:], strict=False))
        for tensor in mixer.spec.tensors:
            owner, name = mixer.owner(tensor.role)
            assert tuple(getattr(owner, name).shape) == tensor.shape, (mixer.path, tensor.role)


def test_mamba2_in_proj_splits_into_z_x_b_c_dt():
    spec = mixer_kinds(build("mamba2"))[0].spec  # I=64, G=8, N=2, H=8
    blocks = {b.name: (b.start, b.stop) for b in spec.projection("in_proj").blocks}
    assert blocks == {"z": (0, 64), "x": (64, 128), "b": (128, 144), "c": (144, 160), "dt": (160, 168)}
    assert spec.conv_channels == 64 + 2 * 8 * 2 and spec.state_shape == (8, 8, 2) and spec.dt_rank == 0
    assert not spec.has_projection("x_proj") and not spec.has_projection("dt_proj")


def test_sizes_from_the_model_equal_sizes_from_the_config():
    lm = tiny_mamba1()
    assert ModelDims.from_model(lm) == ModelDims.from_config(lm.config)
    m2 = build("mamba2")
    assert ModelDims.from_model(m2) == ModelDims.from_config(m2.config)


def test_hybrid_sizes_list_their_attention_mlp_and_expert_targets():
    dims = ModelDims.from_model(build("granitemoehybrid"))
    side = {t.name: (t.in_features, t.out_features, t.count, t.rows, t.experts) for t in dims.side}
    assert side["attn_k"] == (32, 16, 2, (0, 16), 1)  # 2 key-value heads of 8
    assert side["mlp_up"] == (32, 96, 4, (48, 96), 1)  # the up half of the fused shared-MLP input_linear
    assert side["moe_down"] == (24, 32, 4, (0, 32), 2)  # two experts per layer
    assert dims.L == 2 and dims.norms == 2 * 4 + 1


@pytest.mark.parametrize(("scan", "hooks"), [("torch", set(HOOKS)), ("mambapy", {"parallel_adapter"})])
def test_mamba1_hooks_depend_on_the_forward_that_runs(scan, hooks):
    assert all(m.hooks == hooks for m in mixer_kinds(tiny_mamba1(scan)))


def test_transformers_mamba2_forward_honours_no_hook_and_setting_one_is_refused():
    mixer = mixer_kinds(build("mamba2"))[0]
    assert mixer.hooks == frozenset()
    with pytest.raises(ArchitectureError, match=r"backbone.layers.0.mixer: transformers' Mamba2Mixer does not "
                                                r"honour initial_state"):
        mixer.set_hook("initial_state", torch.zeros(mixer.spec.state_shape))


def test_the_project_mamba2_mixer_honours_its_declared_hooks():
    mamba2_mixer = pytest.importorskip("trials.models.mamba2_mixer")
    lm = build("mamba2")
    mamba2_mixer.install_fast_mamba2_mixer(lm, "torch")
    assert all(m.hooks == set(mamba2_mixer.HOOKS) for m in mixer_kinds(lm))


def test_an_unsupported_architecture_names_itself_and_the_supported_ones():
    with pytest.raises(ArchitectureError, match=r"model_type 'llama' is not supported; supported: .*mamba"):
        architecture_of("llama")
    with pytest.raises(ArchitectureError, match="has no SSM mixer"):
        mixer_kinds(torch.nn.Linear(2, 2))
    assert architecture_of("mamba2").kind == "mamba2" and Mamba2Config().model_type == "mamba2"


def test_one_table_says_how_each_architecture_loads_and_what_its_mixers_are():
    """The loader reads the interface's registry (what a checkpoint may be is what the methods know): every row has a
    registered mixer kind, the class it loads as and where its mixers are, and the loader accepts exactly its rows."""
    from types import SimpleNamespace

    from trials.models import interface, loading

    table = interface.architectures()
    assert list(table) == ["mamba", "mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"]
    for model_type, arch in table.items():
        assert arch.kind in interface.KINDS and arch.model_class.endswith("ForCausalLM") and "{i}" in arch.mixers
        assert loading.architecture(SimpleNamespace(model_type=model_type)) == model_type
    with pytest.raises(loading.CheckpointError, match="supported: MambaForCausalLM"):
        loading.architecture(SimpleNamespace(model_type="llama"))
