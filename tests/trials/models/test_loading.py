"""Loading a checkpoint is never silent: another architecture, or weights that do not fit, stop before training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from space.config import ModelSpec, TaskSpec
from trials.models.fixtures import FIXTURES, write_fixture
from trials.models.interface import CheckpointError, architectures
from trials.models.loading import architecture, load_base_model, ssm_mixers
from trials.probe import Probe


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small random Llama (attention only, no SSM) saved by transformers' own save_pretrained."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture_dir(request, tmp_path_factory):
    """A tiny random checkpoint of each supported architecture, written by the fixture script."""
    return request.param, write_fixture(request.param, tmp_path_factory.mktemp(request.param))


def mamba_dir(path, edit):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=300, hidden_size=32, state_size=4, num_hidden_layers=2)
    MambaForCausalLM(cfg).save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_another_architecture_is_refused_naming_what_it_is_and_what_is_supported(llama_dir):
    with pytest.raises(CheckpointError) as err:
        load_base_model(str(llama_dir))
    said = str(err.value)
    assert "is a 'llama' model (LlamaForCausalLM); supported: MambaForCausalLM (model_type 'mamba')" in said
    for model_type, arch in architectures().items():
        assert f"{arch.model_class} (model_type {model_type!r})" in said


def test_the_supported_architectures_are_mamba1_mamba2_and_hybrids_of_both_families():
    kinds = {t: a.family for t, a in architectures().items()}
    assert kinds["mamba"] == "mamba1" and kinds["mamba2"] == "mamba2"
    assert kinds["bamba"] == kinds["granitemoehybrid"] == "hybrid"  # the Granite/Bamba family
    assert {"falcon_h1", "nemotron_h"} <= {t for t, k in kinds.items() if k == "hybrid"}  # the other family


def test_architecture_returns_the_model_type_of_a_supported_config_and_refuses_another(fixture_dir, llama_dir):
    model_type, path = fixture_dir
    assert architecture(AutoConfig.from_pretrained(path)) == model_type
    with pytest.raises(CheckpointError, match="'llama' model"):
        architecture(AutoConfig.from_pretrained(llama_dir))


def test_each_supported_architecture_loads_as_its_class_with_its_own_weights(fixture_dir, tmp_path):
    model_type, path = fixture_dir
    lm = load_base_model(str(path))
    assert type(lm).__name__ == architectures()[model_type].model_class
    # Saved again, it writes the file it was read from (Granite's experts are stored under other names than its
    # modules', so the file is the common ground).
    lm.save_pretrained(tmp_path)
    saved, again = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert saved.keys() == again.keys()
    assert all(torch.equal(again[k], v) for k, v in saved.items())  # copied, not computed: exact


def test_the_ssm_mixers_are_found_at_the_tables_path_and_only_there(fixture_dir):
    model_type, path = fixture_dir
    lm = load_base_model(str(path))
    arch = architectures()[model_type]
    names = [name for name, _ in ssm_mixers(lm)]
    layers = lm.config.num_hidden_layers
    # The fixtures put a mixer in every layer except the hybrids' attention / MLP layers (1 and 3 of 4).
    expected = range(layers) if arch.family != "hybrid" or model_type == "falcon_h1" else (0, 2)
    assert names == [arch.mixers.format(i=i) for i in expected]


def test_a_missing_weight_of_a_hybrid_is_named(tmp_path):
    path = write_fixture("bamba", tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.2.mamba.A_log"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing weight\(s\): model.layers.2.mamba.A_log"):
        load_base_model(str(path))


def test_the_embedded_mamba2_loads_by_name_and_has_learnt_its_corpus():
    from trials.heldout import STDLIB_FILES, stdlib_root
    from trials.models.vocab import ByteTokenizer

    lm = load_base_model("embedded-mamba2").eval()
    assert type(lm).__name__ == "Mamba2ForCausalLM" and lm.config.model_type == "mamba2"
    text = (stdlib_root() / STDLIB_FILES[0]).read_text()[:2000]
    ids = torch.tensor([ByteTokenizer().encode(text)[:256]])  # [1, 256]
    with torch.no_grad():
        loss = lm(input_ids=ids, labels=ids, use_cache=False).loss.item()
    # Chance over the 288-token vocabulary is ln 288 = 5.7 nats; it gives 2.45 here, the Mamba-1 embedded-tiny 2.44
    # (the training loss, 1.18, also averages the easier digit images).
    assert loss < 3.0


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


def test_the_search_probe_opens_the_checkpoint_before_any_trial(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="'llama' model"):
        Probe(ModelSpec(checkpoint=str(llama_dir)), TaskSpec(name="digits"))
    broken = mamba_dir(tmp_path, lambda w: w.pop("backbone.norm_f.weight"))
    with pytest.raises(CheckpointError, match="missing weight"):
        Probe(ModelSpec(checkpoint=str(broken)), TaskSpec(name="digits"))


@pytest.mark.parametrize("model_type", ["mamba2", "bamba", "falcon_h1"])
def test_the_fast_scans_install_the_projects_mamba2_mixer_where_it_covers_the_architecture(model_type, tmp_path):
    mamba2_mixer = pytest.importorskip("trials.models.mamba2_mixer")
    path = write_fixture(model_type, tmp_path)
    covered = {c.__name__ for c in mamba2_mixer.FAST_CLASSES}
    fast = load_base_model(str(path), scan="torch").eval()
    kept = load_base_model(str(path), scan="hf_loop").eval()
    mixer_class = architectures()[model_type].mixer_class
    for _, mixer in ssm_mixers(fast):
        assert isinstance(mixer, mamba2_mixer.FastSSDForward) == (mixer_class in covered)
    assert not any(isinstance(m, mamba2_mixer.FastSSDForward) for _, m in ssm_mixers(kept))
    ids = torch.randint(3, 288, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits,
                                   kept(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_an_unknown_scan_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="model.scan: 'fast' is not one of auto, compiled, torch, mambapy, hf_loop"):
        load_base_model(str(write_fixture("mamba2", tmp_path)), scan="fast")


def test_the_fixture_command_writes_a_checkpoint_the_loader_takes(tmp_path, capsys):
    from trials.models.loading import main

    main(["--write-fixture", "nemotron_h", str(tmp_path / "nh")])
    assert f"model.checkpoint: {tmp_path / 'nh'}" in capsys.readouterr().out
    assert type(load_base_model(str(tmp_path / "nh"))).__name__ == "NemotronHForCausalLM"
    with pytest.raises(ValueError, match="--write-fixture: 'zamba2' is not one of mamba, mamba2, bamba"):
        main(["--write-fixture", "zamba2", str(tmp_path / "z")])


def test_a_checkpoint_saved_in_bf16_loads_in_fp32_with_its_weights(tmp_path):
    """transformers 5 loads dtype="auto" (the checkpoint's own): a bf16 checkpoint would train in bf16 under
    precision fp32 and round LoRA deltas to bf16. The project keeps fp32 master weights whatever was saved."""
    import torch

    from trials.models.fixtures import tiny_model

    saved = tiny_model("mamba").to(torch.bfloat16)
    saved.save_pretrained(tmp_path)
    lm = load_base_model(str(tmp_path))
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    want = dict(saved.named_parameters())
    assert all(torch.equal(p, want[name].float()) for name, p in lm.named_parameters())  # bf16 -> fp32 is exact
