"""The project's Mamba-2 mixer (trials.models.mamba2_mixer) against transformers' own, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from trials.models.loading import quiet_transformers
from trials.models.mamba2_mixer import FastMamba2Mixer, install_fast_mamba2_mixer

VOCAB, HEADS, HEAD_DIM, STATE, K = 40, 8, 8, 4, 4
INNER = HEADS * HEAD_DIM


def tiny_config(groups: int = 8, state: int = STATE) -> Mamba2Config:
    return Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=HEADS, head_dim=HEAD_DIM,
                        n_groups=groups, state_size=state, chunk_size=8, expand=2, conv_kernel=K)


def pair(groups: int = 8, scan: str = "auto", seed: int = 0) -> tuple[Mamba2ForCausalLM, Mamba2ForCausalLM]:
    """transformers' model and the same weights with the project's mixer."""
    quiet_transformers()
    torch.manual_seed(seed)
    ref = Mamba2ForCausalLM(tiny_config(groups)).eval()
    with torch.no_grad():  # non-trivial per-head parameters, so a swapped role would show
        for m in mixers(ref):
            m.D.uniform_(-1, 1)
            m.dt_bias.normal_(0, 1)
            m.norm.weight.uniform_(0.5, 1.5)
            m.conv1d.bias.normal_(0, 0.5)
    ours = copy.deepcopy(ref)
    assert install_fast_mamba2_mixer(ours, scan) == 2
    return ref, ours


def mixers(lm: nn.Module) -> list:
    return [layer.mixer for layer in lm.backbone.layers]


def ids(length: int = 19, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def logits(lm: nn.Module, tokens: torch.Tensor, **kw) -> torch.Tensor:
    return lm(tokens, use_cache=False, **kw).logits


@pytest.mark.parametrize("groups", [8, 2])
@pytest.mark.parametrize("scan", ["auto", "torch"])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_equal_transformers_mixer(groups, scan, train):
    ref, ours = pair(groups, scan)
    ref.train(train)
    ours.train(train)
    assert_same_outputs_and_gradients(ref, ours, ids(37))


def assert_same_outputs_and_gradients(ref: nn.Module, ours: nn.Module, tokens: torch.Tensor) -> None:
    want, got = logits(ref, tokens), logits(ours, tokens)
    assert close(got, want)
    want.square().mean().backward()
    got.square().mean().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert close(q.grad, p.grad, 1e-4), name


def test_the_model_state_dict_is_unchanged_by_the_install():
    ref, ours = pair()
    assert isinstance(mixers(ours)[0], FastMamba2Mixer)
    assert ours.state_dict().keys() == ref.state_dict().keys()


class Delta(nn.Module):
    """W + a fixed delta: what a LoRA/DoRA parametrisation does to a weight."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(delta)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta


@pytest.mark.parametrize("target", ["in_proj.weight", "conv1d.weight", "A_log", "D", "dt_bias", "norm.weight",
                                    "out_proj.weight"])
def test_a_parametrised_weight_changes_the_output_exactly_as_on_transformers_path(target):
    ref, ours = pair(2)
    before = logits(ours, ids())
    for lm in (ref, ours):
        for i, m in enumerate(mixers(lm)):
            module_path, _, name = target.rpartition(".")
            owner = m.get_submodule(module_path) if module_path else m
            w = getattr(owner, name)
            delta = 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(i))
            parametrize.register_parametrization(owner, name, Delta(delta))
    want, got = logits(ref, ids()), logits(ours, ids())
    assert not close(got, before, 1e-3)
    assert close(got, want)
    got.square().mean().backward()
    for m in mixers(ours):
        deltas = [p for n, p in m.named_parameters() if n.endswith(".delta")]
        assert deltas and all(d.grad is not None and d.grad.abs().sum() > 0 for d in deltas)


@pytest.mark.parametrize("proj", ["in_proj", "out_proj"])
def test_forward_hooks_on_the_projections_run(proj):
    ref, ours = pair()
    for lm in (ref, ours):
        for m in mixers(lm):
            getattr(m, proj).register_forward_hook(lambda mod, inp, out: out * 1.5)
    assert close(logits(ours, ids()), logits(ref, ids()))
    assert not close(logits(ours, ids()), logits(pair()[1], ids()), 1e-3)


# --- the hooks methods set ----------------------------------------------------------------------------------

CONV_DIM = INNER + 2 * 2 * STATE  # groups 2


def identity_value(hook: str) -> torch.Tensor:
    return {"initial_state": torch.zeros(HEADS, HEAD_DIM, STATE),
            "conv_state": torch.zeros(K - 1, CONV_DIM),
            "affix_tokens": torch.zeros(0, CONV_DIM),
            "state_offset": torch.zeros(HEADS, HEAD_DIM, STATE)}[hook]


@pytest.mark.parametrize("hook", ["initial_state", "conv_state", "affix_tokens", "state_offset"])
def test_a_hook_at_identity_leaves_the_output_unchanged_and_a_perturbed_one_changes_it_and_gets_a_gradient(hook):
    ref, ours = pair(2)
    want = logits(ref, ids())
    values = []
    for m in mixers(ours):
        value = nn.Parameter(identity_value(hook))
        setattr(m, hook, value)
        values.append(value)
    assert close(logits(ours, ids()), want)
    with torch.no_grad():
        for i, v in enumerate(values):
            shape = (3, CONV_DIM) if hook == "affix_tokens" else v.shape
            v.data = 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(i))
    got = logits(ours, ids())
    assert not close(got, want, 1e-3)
    got.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in values)


def test_a_callable_affix_is_called_on_each_forward():
    _, ours = pair(2)
    tokens = torch.randn(2, CONV_DIM, generator=torch.Generator().manual_seed(0))
    for m in mixers(ours):
        m.affix_tokens = tokens
    want = logits(ours, ids())
    for m in mixers(ours):
        m.affix_tokens = lambda: tokens
    assert close(logits(ours, ids()), want)


def test_initial_and_conv_state_continue_a_sequence_as_transformers_cache_does():
    # transformers' cache after a prefix holds the SSM state [1, H, P, N] and the last K xBC inputs [1, conv_dim, K];
    # the hooks set to them must continue the sequence exactly as scanning it whole.
    ref, ours = pair(2)
    tokens = ids(30, batch=1)
    cut = 13
    whole = logits(ref, tokens)
    cache = ref(tokens[:, :cut], use_cache=True).past_key_values
    for i, m in enumerate(mixers(ours)):
        m.initial_state = cache.get_recurrent_state(i, state_idx=0)[0].clone()  # [H, P, N]
        m.conv_state = cache.get_conv_state(i, state_idx=0)[0, :, 1:].T.clone()  # [K-1, conv_dim]
    assert close(logits(ours, tokens[:, cut:]), whole[:, cut:])


def test_an_initial_state_with_fewer_state_dimensions_is_zero_padded():
    _, ours = pair(2)
    small = torch.randn(HEADS, HEAD_DIM, 2, generator=torch.Generator().manual_seed(0))
    for m in mixers(ours):
        m.initial_state = small
    want = logits(ours, ids())
    for m in mixers(ours):
        m.initial_state = torch.cat([small, torch.zeros(HEADS, HEAD_DIM, STATE - 2)], dim=-1)
    assert close(logits(ours, ids()), want)


class AffixInProj(nn.Module):
    """in_proj for a sequence with n dummy positions in front: those give z = 0, xBC = affix, dt = 0."""

    def __init__(self, in_proj: nn.Linear, affix: torch.Tensor) -> None:
        super().__init__()
        self.in_proj, self.affix = in_proj, affix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.in_proj(h)  # [Bt, n + L, I + conv_dim + H]
        n = self.affix.shape[0]
        front = torch.cat([torch.zeros(n, INNER), self.affix, torch.zeros(n, HEADS)], dim=-1)  # [n, ...]
        return torch.cat([front.expand(h.shape[0], -1, -1), out[:, n:]], dim=1)


def test_affix_tokens_equal_prepending_inputs_whose_xbc_is_the_affix():
    ref, ours = pair(2)
    affix = torch.randn(3, CONV_DIM, generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    ref_mixer, our_mixer = mixers(ref)[0], mixers(ours)[0]
    our_mixer.affix_tokens = affix
    ref_mixer.in_proj = AffixInProj(ref_mixer.in_proj, affix)
    with torch.no_grad():
        want = ref_mixer(torch.cat([torch.zeros(2, 3, 32), h], dim=1))[:, 3:]
        got = our_mixer(h)
    assert close(got, want)


def test_a_state_offset_is_read_out_by_c_like_a_constant_added_to_the_state():
    # y_t = (S_t + O) C_t: with a zero input sequence S_t stays 0 only if dt x B is zero, so compare two runs
    # instead: the offset's effect equals an initial state O that never decays (A -> 0).
    _, ours = pair(2)
    offset = torch.randn(HEADS, HEAD_DIM, STATE, generator=torch.Generator().manual_seed(0))
    for m in mixers(ours):
        with torch.no_grad():
            m.A_log.fill_(-30.0)  # A = -exp(-30): no decay over the sequence
    plain = logits(ours, ids())
    for m in mixers(ours):
        m.state_offset = offset
    with_offset = logits(ours, ids())
    for m in mixers(ours):
        m.state_offset = None
        m.initial_state = offset
    assert not close(with_offset, plain, 1e-3)
    assert close(with_offset, logits(ours, ids()), 1e-4)


def test_padding_is_handled_as_transformers_does():
    # Right padding (row 1) only reaches padded outputs, which the gate zeroes; left padding (row 0) would leak the
    # conv bias of padded positions into the state if xBC were not zeroed after the convolution.
    ref, ours = pair(2)
    tokens = ids(15)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, 9:] = 0
    want = logits(ref, tokens, attention_mask=mask)
    got = logits(ours, tokens, attention_mask=mask)
    assert close(got, want)
    assert close(got[1:, :9], logits(ours, tokens[1:, :9]))


def test_extra_state_dimensions_are_extra_b_and_c_columns_per_group():
    # additional-scan: a state of N + n is the layout of a Mamba-2 with state N + n. Enlarging a state-N model's
    # in_proj and conv1d with the matching rows (per group, after its N columns) must give that model's outputs.
    quiet_transformers()
    torch.manual_seed(0)
    big = Mamba2ForCausalLM(tiny_config(2, STATE + 2)).eval()
    small = Mamba2ForCausalLM(tiny_config(2, STATE)).eval()
    state = {k: v for k, v in big.state_dict().items() if "in_proj" not in k and "conv1d" not in k}
    small.load_state_dict(state, strict=False)
    install_fast_mamba2_mixer(small)
    for m_small, m_big in zip(mixers(small), mixers(big), strict=True):
        for owner, name, source in ((m_small.in_proj, "weight", m_big.in_proj.weight),
                                    (m_small.conv1d, "weight", m_big.conv1d.weight),
                                    (m_small.conv1d, "bias", m_big.conv1d.bias)):
            parametrize.register_parametrization(owner, name, Replace(source.detach().clone()), unsafe=True)
    assert close(logits(small, ids()), logits(big, ids()))


class Replace(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.w


def test_generation_with_a_cache_defers_to_transformers_without_hooks():
    ref, ours = pair(2)
    prompt = ids(6, batch=1)
    want = ref.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=5, do_sample=False), want)  # token ids, not floats


def test_decoding_from_a_cache_with_a_state_hook_set_raises():
    _, ours = pair(2)
    for m in mixers(ours):
        m.initial_state = torch.zeros(HEADS, HEAD_DIM, STATE)
    with pytest.raises(RuntimeError, match="initial_state cannot decode from a generation cache"):
        ours.generate(ids(6, batch=1), max_new_tokens=3, do_sample=False)
    assert ours.generate(ids(6, batch=1), max_new_tokens=3, do_sample=False, use_cache=False).shape == (1, 9)


def test_installing_on_a_model_without_mamba2_mixers_is_an_error():
    lm = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM has no Mamba-2 mixer"):
        install_fast_mamba2_mixer(lm)


# --- hybrids whose mixer has the same structure -------------------------------------------------------------

def bamba() -> nn.Module:
    from transformers import BambaConfig, BambaForCausalLM

    cfg = BambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, attn_layer_indices=[1, 3],
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, mamba_n_heads=16,
                      mamba_d_head=4, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8)
    return BambaForCausalLM(cfg)


def granite() -> nn.Module:
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    cfg = GraniteMoeHybridConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                 layer_types=["mamba", "attention", "mamba", "attention"], num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, shared_intermediate_size=64,
                                 num_local_experts=2, num_experts_per_tok=1, mamba_n_heads=16, mamba_d_head=4,
                                 mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8)
    return GraniteMoeHybridForCausalLM(cfg)


def nemotron_h() -> nn.Module:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, hybrid_override_pattern="M*M",
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, mamba_num_heads=8,
                          mamba_head_dim=8, n_groups=2, ssm_state_size=4, chunk_size=8)
    return NemotronHForCausalLM(cfg)


@pytest.mark.parametrize("build", [bamba, granite, nemotron_h])
def test_hybrid_mixers_of_the_same_structure_get_the_fast_forward_with_equal_outputs(build):
    quiet_transformers()
    torch.manual_seed(0)
    ref = build().eval()
    ours = copy.deepcopy(ref)
    assert install_fast_mamba2_mixer(ours) == 2
    assert_same_outputs_and_gradients(ref, ours, ids(21))
