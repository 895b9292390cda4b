"""The BPE-vocabulary embedded model: tokenizer learnt from the corpus, token windows, and a checkpoint that a
trial (and the scratch baseline) loads with its own tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trials.pretraining.test_pretrain import _fake_site
from trials.pretraining import pretrain, pretrain_bpe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    out = root / "corpus.xz"
    pretrain.build_corpus("stdlib+packages", out, packages=["pkg"], site=_fake_site(root),
                          held_out=pretrain.HeldOutText([]), stdlib=pretrain.stdlib_files("tiny"))
    return out


def test_the_tokenizer_is_learnt_from_training_files_and_encodes_any_text(corpus):
    loaded = pretrain.load_corpus_file(corpus)
    texts = pretrain_bpe.corpus_files(loaded, "train")
    assert sum(len(t.encode()) for t in texts) == len(loaded.train)
    tok = pretrain_bpe.train_tokenizer(texts, 600)
    assert len(tok) == 600 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    odd = "déjà vu \t\x00 ∑ 🙂 def __init__(self):"  # bytes the corpus may never hold still encode
    ids = tok(odd, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == odd
    # Merges were learnt: common source text takes fewer tokens than bytes.
    assert len(tok("def __init__(self):\n        return self", add_special_tokens=False)["input_ids"]) < 20
    tokens = pretrain_bpe.encode_files(tok, texts[:2])
    assert (tokens == 1).sum() == 2 and tokens[-1] == 1 and tokens.dtype.name == "uint16"


def test_token_batches_are_windows_of_the_token_stream():
    tokens = torch.arange(1000, dtype=torch.int32)
    x, y = next(pretrain_bpe.token_batches(tokens, batch=4, length=16, seed=0))
    assert x.shape == (4, 16) and x.dtype == torch.long and torch.equal(x, y)  # token ids, not computed floats
    assert ((x[:, 1:] - x[:, :-1]) == 1).all()


def test_a_pretrained_bpe_checkpoint_is_loaded_with_its_tokenizer_by_a_trial_and_the_scratch_arm(corpus, tmp_path):
    from space.config import TrialConfig
    from trials.run import run_trial
    from trials.tasks.tokenizers import HFTokenizer, make_tokenizer

    out = tmp_path / "ckpt"
    info = pretrain_bpe.pretrain_bpe(out, corpus, vocab_size=500, steps=3, batch=4, length=16, hidden=16, layers=2,
                                     state=4, log_every=1, val_windows=4, name="t", checkpoint="not-shipped")
    assert info["vocab_size"] == 500 and info["bytes_per_token"] > 1.0 and info["steps"] == 3
    assert info["val_loss"] > 0 and info["val_loss_per_token"] > info["val_loss"]  # a token covers > 1 byte
    saved = json.loads((out / "config.json").read_text())
    assert saved["vocab_size"] == 500 and saved["pad_token_id"] == 0 and saved["eos_token_id"] == 1
    card = (out / "README.md").read_text()
    assert "--steps 3" in card and "500 tokens" in card and "nats/byte" in card

    yaml = f"""
model: {{checkpoint: {out}}}
task: {{name: pydoc_topics, shots_per_class: 2}}
methods:
  lora_in_proj: {{rank: 2}}
training: {{rungs: [2], batch_size: 4, learning_rate: 0.005}}
seed: 0
"""
    cfg = TrialConfig.from_yaml(yaml)
    tok = make_tokenizer(cfg.model)
    assert isinstance(tok, HFTokenizer) and tok.decode(tok.encode("class A:")) == "class A:"
    result = run_trial(cfg, report=lambda r: None)
    assert 0.0 <= result.val_accuracy <= 1.0
    scratch_yaml = yaml.replace("methods:\n  lora_in_proj: {rank: 2}\n", "baseline: scratch\n")
    scratch = run_trial(TrialConfig.from_yaml(scratch_yaml), report=lambda r: None)
    assert 0.0 <= scratch.val_accuracy <= 1.0


def test_a_corpus_with_too_few_validation_tokens_is_refused_before_training(corpus, tmp_path):
    with pytest.raises(ValueError, match="not one 100000-token window"):
        pretrain_bpe.pretrain_bpe(tmp_path / "x", corpus, vocab_size=400, steps=1, batch=2, length=100_000,
                                  hidden=16, layers=1, state=4)


def test_the_shipped_bpe_checkpoint_is_its_card_s_model_with_its_own_tokenizer():
    from space.config import ModelSpec
    from trials.models.loading import EMBEDDED_CHECKPOINTS, load_base_model
    from trials.tasks.tokenizers import HFTokenizer, make_tokenizer

    path = EMBEDDED_CHECKPOINTS["embedded-small-bpe"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "pretrain.json"):
        assert (path / name).exists(), name
    info = json.loads((path / "pretrain.json").read_text())
    assert f"python -m trials.pretraining.pretrain_bpe --corpus-file {info['corpus_file']} --steps {info['steps']}" in (
        path / "README.md").read_text()
    lm = load_base_model("embedded-small-bpe")
    assert info["parameters"] == sum(p.numel() for p in lm.parameters())
    assert (lm.config.hidden_size, lm.config.num_hidden_layers, lm.config.vocab_size) == (
        info["hidden_size"], info["num_hidden_layers"], info["vocab_size"])
    tok = make_tokenizer(ModelSpec(checkpoint="embedded-small-bpe"))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 1
    text = "def read(self, size=-1):\n    Return up to size bytes."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < lm.config.vocab_size and len(ids) < len(text) / 2
