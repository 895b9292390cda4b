"""Cached generation equals uncached generation, compared on scores of a model whose logits are far from uniform,
and the transformers signatures the project overrides or reads are the ones it handles.

transformers 5.24 renamed the mixer's cache argument (``cache_params`` -> ``cache``); a mixer that reads only
the old name receives the cache in ``**kwargs`` and decodes every step from a zero state. On a model whose next
tokens are nearly tied, the tokens can still agree, so these tests compare scores (logits), on a model
initialised with a wide range so that a wrong state moves them far.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaModel

from space.methods import PromptConfig
from tests.conftest import SCAN_PATHS
from tests.trials.methods.test_method_details import _perturbed as perturbed
from tests.trials.methods.test_methods import CONFIGS, PLAIN, needs_project_mixer, on_transformers_path
from trials.models.loading import quiet_transformers, use_scan
from trials.models.mamba1_mixer import CACHE_KWARG, CACHE_KWARGS, FastMambaMixer

STEPS = 4
# Methods whose hooks transformers' cached path skips refuse to decode from a cache (test_method_details), and so
# does a prompt suffix (it must follow the newest token); every other method claims cached generation.
REFUSED = {name for name in CONFIGS if needs_project_mixer(name.split("+")[0])
           or (name.startswith("prompt_tuning") and CONFIGS[name].position != "prefix")}
CACHED = [name for name in CONFIGS if name not in REFUSED]


def sharp_lm(path: str) -> MambaForCausalLM:
    """A tiny Mamba-1 whose logits spread widely (initializer_range 0.5), so a wrong decoding state shows."""
    quiet_transformers()
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                      initializer_range=0.5)
    return use_scan(MambaForCausalLM(cfg), path).eval()


def scores(lm, ids: torch.Tensor, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, L + STEPS] and the logits of every generated step [STEPS, B, V]."""
    with torch.no_grad():
        out = lm.generate(ids, max_new_tokens=STEPS, do_sample=False, use_cache=use_cache, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def ids():
    return torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("path", SCAN_PATHS)
@pytest.mark.parametrize("name", ["none", *CACHED])
def test_cached_decoding_gives_the_scores_of_uncached_decoding(path, name, ids):
    lm = sharp_lm(path)
    if name != "none":
        lm = perturbed(lm, {name.split("+")[0]: CONFIGS[name]})
    want_tokens, want = scores(lm, ids, use_cache=False)
    # The check can only see a wrong decoding state if the logits are far from uniform.
    assert float((want.amax(-1) - want.amin(-1)).min()) > 1.0
    got_tokens, got = scores(lm, ids, use_cache=True)
    assert max_rel(got, want) < 1e-4  # fp32 throughout
    assert torch.equal(got_tokens, want_tokens)  # integer tokens


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_every_method_at_once_decodes_from_the_cache_as_without_it(path, ids):
    lm = perturbed(sharp_lm(path), {n: CONFIGS[n] for n in PLAIN if n not in REFUSED})
    _, want = scores(lm, ids, use_cache=False)
    _, got = scores(lm, ids, use_cache=True)
    assert max_rel(got, want) < 1e-4


def test_the_mixer_receives_the_cache_on_every_decoding_step(ids):
    """Behavioural check of the keyword the installed transformers passes: each mixer call during cached
    generation carries a cache under a name the project's mixer reads."""
    lm = sharp_lm("torch")
    seen: list[set[str]] = []

    def record(module, args, kwargs):
        seen.append({k for k in CACHE_KWARGS if kwargs.get(k) is not None})

    for layer in lm.backbone.layers:
        layer.mixer.register_forward_pre_hook(record, with_kwargs=True)
    scores(lm, ids, use_cache=True)
    assert len(seen) == STEPS * len(lm.backbone.layers)
    assert all(names for names in seen), "a mixer call of cached generation carried no cache the mixer reads"


def test_the_overridden_mixer_forward_matches_the_installed_signature():
    """FastMambaMixer.forward overrides MambaMixer.forward: every parameter transformers declares must be one the
    override takes, and the cache must be under a name it knows, so that a future rename fails here."""
    theirs = inspect.signature(MambaMixer.forward).parameters
    ours = inspect.signature(FastMambaMixer.forward).parameters
    assert CACHE_KWARG in theirs
    assert set(theirs) <= set(ours), f"parameters the project's mixer does not take: {set(theirs) - set(ours)}"
    assert set(CACHE_KWARGS) <= set(ours)
    unknown = {n for n, p in theirs.items() if p.kind is not p.VAR_KEYWORD} - {
        "self", "hidden_states", "attention_mask", *CACHE_KWARGS}
    assert not unknown, f"MambaMixer.forward gained parameters the project's mixer ignores: {unknown}"


def test_the_backbone_forward_has_the_arguments_prompt_tuning_reads():
    """Prompt tuning's pre-hook binds the backbone's arguments by name (trials/methods/prompt.py)."""
    names = set(inspect.signature(MambaModel.forward).parameters)
    assert {"input_ids", "inputs_embeds", "attention_mask"} <= names
    assert names & set(CACHE_KWARGS), "MambaModel.forward takes its generation cache under a new name"


def test_a_decoding_step_with_a_state_hook_refuses_under_either_cache_keyword(ids):
    lm = perturbed(sharp_lm("torch"), {"initial_state": CONFIGS["initial_state"]})
    assert not on_transformers_path(lm)
    mixer = lm.backbone.layers[0].mixer
    hidden = torch.randn(2, 1, 32)
    for keyword in CACHE_KWARGS:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=lm.config)
        with torch.no_grad():
            mixer(hidden, **{keyword: cache})  # the first call runs the project's scan
            with pytest.raises(RuntimeError, match="initial_state cannot decode from a generation cache"):
                mixer(hidden, **{keyword: cache})


@pytest.mark.parametrize("path", SCAN_PATHS)
@pytest.mark.parametrize("position", ["suffix", "prefix_suffix"])
def test_a_prompt_suffix_runs_an_eval_forward_but_refuses_to_decode_from_a_cache(path, position, ids):
    lm = perturbed(sharp_lm(path), {"prompt_tuning": PromptConfig(tokens=2, position=position)})
    with torch.no_grad():
        assert max_rel(lm(ids).logits, lm(ids, use_cache=False).logits) < 1e-5  # a prefill alone is fine
    scores(lm, ids, use_cache=False)
    with pytest.raises(RuntimeError, match="prompt_tuning with a suffix cannot decode from a generation cache"):
        scores(lm, ids, use_cache=True)


def test_every_method_either_decodes_from_a_cache_or_refuses():
    assert set(CACHED) | REFUSED == set(CONFIGS)
    assert {n.split("+")[0] for n in REFUSED} == {"affix_tuning", "initial_state", "state_offset", "prompt_tuning"}
