"""Reproducible pretraining recipe for the embedded tiny Mamba-1 checkpoint.

    python -m trials.pretrain --out trials/assets/tiny-mamba

Data present on every machine with Python 3.11 and scikit-learn, and disjoint from every downstream
validation and test example:
- text: the source of a fixed list of standard-library modules, as bytes (the downstream text task uses the
  language reference in ``pydoc_data.topics``, which this corpus does not contain);
- images: scikit-learn's 8x8 digits outside the ``digits`` task's validation and test splits, as unlabelled
  64-step pixel sequences (labels are never read).
The objective is next-token prediction. The output is a Hugging Face checkpoint directory
(``save_pretrained``, safetensors) with a card (README.md) saying how it was made.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from trials.data import EMBEDDED_VOCAB_SIZE, PAD_ID, ByteTokenizer, digit_tokens, digits_split_indices

STDLIB_FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "inspect.py",
                "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "random.py",
                "shutil.py", "statistics.py", "string.py", "textwrap.py", "typing.py", "subprocess.py")


def text_corpus() -> list[int]:
    root = Path(sysconfig.get_paths()["stdlib"])
    tok = ByteTokenizer()
    ids: list[int] = []
    for rel in STDLIB_FILES:
        ids.extend(tok.encode((root / rel).read_text(encoding="utf-8")))
    return ids


def image_corpus(seed: int = 0) -> list[list[int]]:
    from sklearn.datasets import load_digits

    images = load_digits().images
    idx = digits_split_indices(seed)
    allowed = np.concatenate([idx["train"], idx["rest"]])  # never val or test
    return [digit_tokens(images[i]) for i in allowed]


def build_config(hidden: int, layers: int, state: int):
    from transformers import MambaConfig

    return MambaConfig(vocab_size=EMBEDDED_VOCAB_SIZE, hidden_size=hidden, state_size=state,
                       num_hidden_layers=layers, expand=2, conv_kernel=4, pad_token_id=PAD_ID,
                       bos_token_id=1, eos_token_id=2, use_mambapy=True, tie_word_embeddings=True)


def batches(text: list[int], images: list[list[int]], batch: int, length: int, rng: random.Random):
    """Half text windows, half digit images (padded to ``length`` with PAD, which the loss ignores)."""
    while True:
        rows, labels = [], []
        for b in range(batch):
            if b % 2 == 0:
                start = rng.randrange(0, len(text) - length)
                seq = text[start : start + length]
            else:
                seq = rng.choice(images)[:length]
            pad = length - len(seq)
            rows.append(seq + [PAD_ID] * pad)
            labels.append(seq + [-100] * pad)
        yield torch.tensor(rows), torch.tensor(labels)


def pretrain(out: Path, steps: int, batch: int, length: int, lr: float, hidden: int, layers: int,
             state: int, seed: int, log_every: int = 50) -> dict:
    from transformers import MambaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    text, images = text_corpus(), image_corpus(seed)
    model = MambaForCausalLM(build_config(hidden, layers, state))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.time()
    losses: list[float] = []
    it = batches(text, images, batch, length, rng)
    for step in range(steps):
        x, y = next(it)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    info = {"steps": steps, "batch_size": batch, "seq_len": length, "lr": lr, "seed": seed,
            "hidden_size": hidden, "num_hidden_layers": layers, "state_size": state,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(losses[-log_every:])), "seconds": round(seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "text_bytes": len(text), "images": len(images)}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    files = ", ".join(STDLIB_FILES)
    return f"""# tiny-mamba: the embedded pretrained Mamba-1 of mamba-peft-search

A `MambaForCausalLM` (hidden {info['hidden_size']}, {info['num_hidden_layers']} layers, state \
{info['state_size']}, vocab {EMBEDDED_VOCAB_SIZE}, {info['parameters']:,} parameters) pretrained by next-token \
prediction, so that PEFT in the test suite and in `make run` adapts a model that has learnt something.

How it was made: `python -m trials.pretrain --out trials/assets/tiny-mamba --steps {info['steps']} \
--seed {info['seed']}` (the defaults of that command).

- Data: half of each batch is {info['seq_len']}-byte windows of the source of these Python \
{info['python']} standard-library files ({info['text_bytes']:,} bytes): {files}. The other half is \
{info['images']} scikit-learn 8x8 digit images read as 64 pixel tokens, unlabelled, drawn only from the \
`digits` task's training split and the images outside all splits. No validation or test example of any \
downstream task, and no text of `pydoc_data.topics`, is seen.
- Tokens: 0 pad, 1 cls, 2 sep, 3..258 bytes, 259..275 pixel levels 0..16 (`trials/data.py`).
- Schedule: {info['steps']} steps, batch {info['batch_size']}, AdamW lr {info['lr']} (5% warm-up, cosine), \
weight decay 0.01, gradient clip 1.0, seed {info['seed']}, fp32 on CPU (torch {info['torch']}).
- Time: {info['seconds']} s. Final training loss (mean of the last 50 steps): {info['final_loss']:.3f} nats/token.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("trials/assets/tiny-mamba"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = pretrain(a.out, a.steps, a.batch_size, a.seq_len, a.lr, a.hidden, a.layers, a.state, a.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
