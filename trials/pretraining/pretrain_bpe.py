"""Pretrain an embedded Mamba over a BPE vocabulary learnt from the ``stdlib+packages`` corpus.

    python -m trials.pretraining.pretrain --build-corpus stdlib+packages --corpus-out corpus/stdlib+packages.xz
    python -m trials.pretraining.pretrain_bpe --corpus-file corpus/stdlib+packages.xz --max-seconds 3600 \
        --out trials/assets/small-mamba-bpe

Why a second tokenizer. The byte-level embedded models spend a position on every byte, so a CPU hour of
pretraining reads ~4x less text than it would over subword tokens, and what a downstream classifier pools over is
letters, not words. Here a byte-level BPE (``tokenizers``, GPT-2's byte alphabet, so every string encodes and
nothing is unknown) is learnt from the corpus's training files alone, never from a downstream task's text; the
corpus is then encoded file by file, an ``<eos>`` after each file, and the model is pretrained by next-token
prediction on windows of it. The checkpoint directory holds the tokenizer (``tokenizer.json`` and
``tokenizer_config.json``), so ``model.tokenizer: auto`` uses it for every text task and ``trials.compare``'s
``scratch`` arm gets the same vocabulary with random weights. The ``digits`` task (pixel tokens of the byte
layout) means nothing to this model; it is for text.

The architecture, optimiser, schedule and step timing are ``trials.pretraining.pretrain``'s; only the tokens differ.
Validation loss is reported per token and per byte (summed over a token window, divided by the bytes it covers),
so it compares with the byte-level models' nats/byte.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trials.pretraining.pretrain import (
    ByteCorpus,
    build_config,
    load_corpus_file,
    scan_path,
    seconds_per_step,
    steps_that_fit,
    train_loop,
)

PAD_TOKEN, EOS_TOKEN = "<pad>", "<eos>"  # ids 0 and 1: the config's pad and bos/eos


def corpus_files(corpus: ByteCorpus, split: str) -> list[str]:
    """The texts of one split's files, in manifest order (the corpus keeps only UTF-8 files)."""
    data = corpus.train if split == "train" else corpus.val
    out, at = [], 0
    for f in corpus.manifest["files"]:
        if f["split"] == split:
            out.append(bytes(data[at : at + f["bytes"]]).decode("utf-8"))
            at += f["bytes"]
    if at != len(data):
        raise ValueError(f"corpus {split} split: the manifest's files cover {at} bytes, the split has {len(data)}")
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE learnt from ``texts``, wrapped as a transformers fast tokenizer (pad id 0, eos id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size: {vocab_size} is too small for the 256 byte symbols plus merges")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, model_max_length=1 << 20)


def encode_files(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Every file's tokens followed by ``<eos>``, concatenated: a uint16 array (the vocabulary is < 65,536)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return np.fromiter((t for row in ids for t in (*row, eos)), dtype=np.uint16)


def token_batches(tokens: torch.Tensor, batch: int, length: int, seed: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random ``length``-token windows of ``tokens`` [T]; the labels are the inputs (the model shifts them)."""
    rng = np.random.default_rng(seed)
    offsets = torch.arange(length)
    while True:
        starts = torch.from_numpy(rng.integers(0, len(tokens) - length, size=batch))
        x = tokens[starts[:, None] + offsets].long()  # [B, L]
        yield x, x


@torch.no_grad()
def validation_loss(model: Any, tokens: torch.Tensor, tokenizer: Any, length: int, batch: int,
                    max_windows: int) -> dict[str, float]:
    """Mean next-token loss over the first ``max_windows`` non-overlapping windows of ``tokens``, per token and
    per byte of the text those predicted tokens decode to."""
    n = min(max_windows, len(tokens) // length)
    if n < 1:
        raise ValueError(f"validation loss: {len(tokens)} validation tokens, not one {length}-token window")
    windows = tokens[: n * length].view(n, length).long()  # [n, L]
    model.eval()
    nats = 0.0
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        nats += float(model(input_ids=x, labels=x, use_cache=False).loss) * x.shape[0] * (length - 1)
    model.train()
    predicted = windows[:, 1:].reshape(-1).tolist()
    n_bytes = len(tokenizer.decode(predicted).encode("utf-8"))
    return {"val_loss_per_token": round(nats / (n * (length - 1)), 4), "val_loss": round(nats / n_bytes, 4),
            "val_tokens": n * (length - 1), "val_bytes": n_bytes}


def pretrain_bpe(out: Path, corpus_file: Path, vocab_size: int = 4096, steps: int = 6000, batch: int = 32,
                 length: int = 128, lr: float = 2e-3, hidden: int = 128, layers: int = 4, state: int = 16,
                 seed: int = 0, max_seconds: float | None = None, log_every: int = 50, val_windows: int = 256,
                 name: str = "small-mamba-bpe", checkpoint: str = "embedded-small-bpe") -> dict:
    """Learn the tokenizer, encode the corpus, pretrain and save the checkpoint with its tokenizer and card."""
    from transformers import AutoModelForCausalLM

    from trials.models.loading import use_scan

    t_begin = time.time()
    torch.manual_seed(seed)
    corpus = load_corpus_file(corpus_file)
    train_texts, val_texts = corpus_files(corpus, "train"), corpus_files(corpus, "val")
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train = torch.from_numpy(encode_files(tokenizer, train_texts).astype(np.int32))
    val = torch.from_numpy(encode_files(tokenizer, val_texts).astype(np.int32))
    if len(val) < length:
        raise ValueError(f"--corpus-file {corpus_file}: its validation files make {len(val)} tokens, not one "
                         f"{length}-token window")
    bytes_per_token = len(corpus.train) / len(train)
    print(f"tokenizer: {len(tokenizer)} tokens; {len(train):,} training tokens ({bytes_per_token:.2f} bytes "
          f"each), {len(val):,} validation tokens; {time.time() - t_begin:.0f} s", flush=True)
    config = build_config(hidden, layers, state)
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    use_scan(model, "auto")
    it = token_batches(train, batch, length, seed)
    timed_step = None
    if max_seconds is not None:
        timed_step = seconds_per_step(model, token_batches(train, batch, length, seed + 1), lr, "cpu")
        steps = steps_that_fit(max_seconds, t_begin, timed_step, math.ceil(val_windows / batch))
        print(f"--max-seconds {max_seconds:g}: {timed_step * 1000:.1f} ms/step; training {steps} steps "
              f"(reproduce with --steps {steps})", flush=True)
    final_loss, seconds = train_loop(model, it, steps, lr, log_every)
    val_scores = validation_loss(model, val, tokenizer, length, batch, val_windows)
    print(f"validation loss {val_scores['val_loss_per_token']:.4f} nats/token, {val_scores['val_loss']:.4f} "
          f"nats/byte", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    m = corpus.manifest
    info = {"recipe": "small-bpe", "name": name, "checkpoint": checkpoint, "corpus": m["corpus"],
            "corpus_file": str(corpus_file), "corpus_sha256": m["sha256"], "corpus_python": m["python"],
            "files": len(train_texts), "val_files": len(val_texts), "text_bytes": len(corpus.train),
            "packages": m["packages"], "dropped": m["dropped"], "tokenizer": "byte-level BPE (tokenizers)",
            "vocab_size": len(tokenizer), "train_tokens": len(train), "bytes_per_token": round(bytes_per_token, 3),
            "steps": steps, "batch_size": batch, "seq_len": length, "lr": lr, "seed": seed,
            "hidden_size": hidden, "num_hidden_layers": layers, "state_size": state, "arch": "mamba",
            "class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "tokens_seen": steps * batch * length,
            "final_loss": final_loss,
            "seconds": round(seconds, 1), "total_seconds": round(time.time() - t_begin, 1),
            "timed_ms_per_step": None if timed_step is None else round(timed_step * 1000, 2),
            "max_seconds": max_seconds, "threads": torch.get_num_threads(), "scan_path": scan_path("cpu"),
            "device_name": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), **val_scores}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    dropped = info["dropped"]
    timed = ("" if info["max_seconds"] is None else
             f"; the step count was chosen by `--max-seconds {info['max_seconds']:g}`")
    return f"""# {info['name']}: an embedded pretrained Mamba-1 over a BPE vocabulary (`model.checkpoint: \
{info['checkpoint']}`)

A `{info['class']}` (hidden {info['hidden_size']}, {info['num_hidden_layers']} layers, state {info['state_size']}, \
vocab {info['vocab_size']}, {info['parameters']:,} parameters, embeddings tied to the output) pretrained by \
next-token prediction over a byte-level BPE vocabulary learnt from the same corpus \
(`trials/pretraining/pretrain_bpe.py`).

How it was made: `python -m trials.pretraining.pretrain_bpe --corpus-file {info['corpus_file']} \
--steps {info['steps']} --out OUT` (the corpus file is built by `python -m trials.pretraining.pretrain \
--build-corpus {info['corpus']} --corpus-out PATH`{timed}).

- Text: the `{info['corpus']}` corpus (sha256 {info['corpus_sha256'][:16]}..., built on Python \
{info['corpus_python']}): {info['files']:,} training files, {info['text_bytes']:,} bytes, the standard library \
without the held-out modules and the .py, .rst, .txt and .md files of: {', '.join(info['packages'].values())}. \
Dropped: {dropped['held_out']} files holding held-out text (`pydoc_data.topics`, the stdlib tasks' text), \
{dropped['duplicate']} duplicates, {dropped['too_large']} too large, {dropped['not_utf8']} not UTF-8. \
{info['val_files']} further files are the validation slice.
- Tokenizer: {info['tokenizer']}, {info['vocab_size']} tokens (`<pad>` 0, `<eos>` 1, which ends every file), \
learnt from the training files only: {info['train_tokens']:,} training tokens, {info['bytes_per_token']} bytes per \
token.
- Held out: no validation or test example of any downstream task, no text of `pydoc_data.topics`, no source of \
the modules the stdlib tasks are made from. The `digits` task's pixel tokens mean nothing to this model.
- Schedule: {info['steps']} steps, batch {info['batch_size']} x {info['seq_len']} tokens \
({info['tokens_seen']:,} tokens seen), AdamW lr {info['lr']} (5% warm-up, cosine), weight decay 0.01, gradient \
clip 1.0, seed {info['seed']}, fp32 on {info['device_name']} CPU ({info['threads']} threads, torch \
{info['torch']}, {info['scan_path']}).
- Time: {info['seconds']} s of training, {info['total_seconds']} s in all. Final training loss (mean of the last \
50 steps): {info['final_loss']:.3f} nats/token. Validation loss on the held-out files: \
{info['val_loss_per_token']:.4f} nats/token, {info['val_loss']:.4f} nats/byte ({info['val_tokens']:,} tokens, \
{info['val_bytes']:,} bytes).
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-file", type=Path, required=True,
                   help="written by trials.pretraining.pretrain --build-corpus")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--max-seconds", type=float, help="time the first steps, then train as many as fit")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128, help="window length in tokens")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = pretrain_bpe(a.out, a.corpus_file, a.vocab_size, a.steps, a.batch, a.length, a.lr, seed=a.seed,
                        max_seconds=a.max_seconds)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
