"""The task wrappers (a classifier, or the causal LM itself) work on every supported architecture."""

from __future__ import annotations

import pytest
import torch

from trials.models.fixtures import FIXTURES, tiny_model
from trials.tasks.registry import task_model
from trials.tasks.types.causal_lm import LanguageModel
from trials.tasks.types.classification import SequenceClassifier

ARCHS = sorted(FIXTURES)


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [3, 10] of lengths 10, 6 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    lengths = torch.tensor([10, 6, 1])
    ids[torch.arange(10)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


@pytest.mark.parametrize("arch", ARCHS)
def test_the_language_model_gives_the_causal_lms_own_logits(arch):
    """Embedding lookup, base model and output head (with Granite's and FalconH1's multipliers) are the LM's."""
    lm = tiny_model(arch).eval()
    ids, lengths = batch(lm.config.vocab_size)
    with torch.no_grad():
        want = lm(input_ids=ids, use_cache=False).logits  # [3, 10, V]
        got = LanguageModel(lm)(ids, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_continuation_logprobs_read_the_lms_own_logits(arch):
    lm = tiny_model(arch).eval()
    ids, lengths = batch(lm.config.vocab_size)
    starts = torch.tensor([4, 2, 1])
    with torch.no_grad():
        summed, count = LanguageModel(lm).continuation_logprobs(ids, lengths, starts)
        logp = lm(input_ids=ids, use_cache=False).logits.log_softmax(-1)  # [3, 10, V]
    want = torch.stack([logp[i, s - 1:n - 1].gather(1, ids[i, s:n, None]).sum()
                        for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True))])
    torch.testing.assert_close(summed, want, rtol=1e-5, atol=1e-4)
    assert count.tolist() == [6, 4, 0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_classifier_trains_on_every_architecture(arch, pooling):
    lm = tiny_model(arch).train()
    model = task_model(lm, "classification", 3, pooling)
    assert isinstance(model, SequenceClassifier)
    ids, lengths = batch(lm.config.vocab_size)
    logits = model(ids, lengths)  # [3, 3]
    assert logits.shape == (3, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    embeddings = lm.get_input_embeddings().weight
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0  # the gradient reached the bottom


@pytest.mark.parametrize("arch", ARCHS)
def test_a_causal_lm_trains_on_every_architecture(arch):
    lm = tiny_model(arch).train()
    model = task_model(lm, "causal_lm", 0, "last")
    assert isinstance(model, LanguageModel)
    ids, lengths = batch(lm.config.vocab_size)
    logits = model(ids, lengths)  # [3, 10, V]
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    grads = [p.grad for p in lm.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_pooling_reads_only_the_real_positions(arch):
    """Last pooling reads position length - 1; mean pooling averages positions before length, whatever the pad."""
    lm = tiny_model(arch).eval()
    ids, lengths = batch(lm.config.vocab_size)
    other = ids.clone()
    other[torch.arange(10)[None, :] >= lengths[:, None]] = 7  # a different pad token
    with torch.no_grad():
        hidden = LanguageModel(lm).hidden(ids, lengths)  # [3, 10, D]
        for pooling in ("last", "mean"):
            clf = SequenceClassifier(lm, 2, pooling)
            got = clf.pooled(ids, lengths)  # [3, D]
            torch.testing.assert_close(got, clf.pooled(other, lengths), rtol=1e-5, atol=1e-5)
            want = (hidden[torch.arange(3), lengths - 1] if pooling == "last" else
                    torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths.tolist())]))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_on_mamba1_the_wrapper_reads_the_backbone_prompt_tuning_is_installed_on():
    """Prompt tuning sets ``backbone.prompt_tuning``; the wrapper must see that module to pass the real-token mask."""
    lm = tiny_model("mamba")
    assert LanguageModel(lm).backbone is lm.backbone
    seen: list = []
    lm.backbone.prompt_tuning = object()
    lm.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    ids, lengths = batch(lm.config.vocab_size)
    with torch.no_grad():
        LanguageModel(lm).hidden(ids, lengths)
    assert seen[0].tolist() == (torch.arange(10)[None, :] < lengths[:, None]).long().tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_on_cuda_pooling_and_continuations_accept_lengths_from_the_cpu_and_match_it(arch):
    """The batch's lengths may stay on the CPU while the model is on the GPU (the mean-pooling mask was built on
    lengths' device, and so failed on a GPU)."""
    lm = tiny_model(arch).eval()
    ids, lengths = batch(lm.config.vocab_size)
    starts = torch.tensor([4, 2, 1])
    with torch.no_grad():
        want = {p: SequenceClassifier(lm, 2, p).pooled(ids, lengths) for p in ("last", "mean")}
        want_lp, _ = LanguageModel(lm).continuation_logprobs(ids, lengths, starts)
        lm.cuda()
        for pooling in ("last", "mean"):
            got = SequenceClassifier(lm, 2, pooling).pooled(ids.cuda(), lengths)  # lengths on the CPU
            torch.testing.assert_close(got.cpu(), want[pooling], rtol=1e-4, atol=1e-4)
        got_lp, _ = LanguageModel(lm).continuation_logprobs(ids.cuda(), lengths, starts)
    torch.testing.assert_close(got_lp.cpu(), want_lp, rtol=1e-4, atol=1e-3)
