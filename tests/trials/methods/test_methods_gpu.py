"""Liveness of every method on CUDA: the project's mixer hands mamba-ssm's fused kernel the effective weights
(or leaves it when a hook needs the scan path). Marked ``gpu``: skipped without a CUDA device, run with one."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from tests.trials.methods.test_methods import CONFIGS, PLAIN, methods_of, perturb
from trials.methods import apply_methods
from trials.models.loading import use_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def model(scan: str):
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)  # as tiny_lm
    return use_scan(MambaForCausalLM(cfg), scan)


@pytest.mark.parametrize("combo", [(name,) for name in CONFIGS] + [tuple(PLAIN)], ids=lambda c: "&".join(c)[:60])
def test_every_trainable_tensor_gets_a_gradient_on_cuda_and_outputs_match_cpu(combo):
    cpu = model("torch")
    methods = methods_of(combo)
    applied = apply_methods(cpu, methods)
    perturb(applied)
    ids = torch.randint(3, 40, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = cpu.eval()(ids, use_cache=False).logits
    gpu = cpu.cuda().train()
    torch.manual_seed(0)  # dropout variants: compare in eval mode only
    gpu.eval()
    with torch.no_grad():
        got = gpu(ids.cuda(), use_cache=False).logits.cpu()
    assert (got - want).abs().max() / want.abs().max() < 1e-3
    gpu.train()
    gpu(ids.cuda(), use_cache=False).logits.square().mean().backward()
    for name, p in gpu.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient on CUDA"


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_the_classifier_pools_on_the_device_its_inputs_are_on(pooling):
    from trials.tasks.types.classification import SequenceClassifier

    torch.manual_seed(0)
    clf = SequenceClassifier(model("torch"), num_classes=3, pooling=pooling).eval()
    ids = torch.randint(3, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([9, 5, 1, 7])
    with torch.no_grad():
        want = clf(ids, lengths)
        got = clf.cuda()(ids.cuda(), lengths.cuda()).cpu()
    assert (got - want).abs().max() < 1e-4 * want.abs().max() + 1e-6
