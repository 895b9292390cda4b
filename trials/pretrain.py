"""Reproducible pretraining recipes for the embedded checkpoints (Mamba-1, and a Mamba-2).

    python -m trials.pretrain --recipe small --out trials/assets/small-mamba   # `embedded`: hidden 128, 503k
    python -m trials.pretrain --recipe tiny --out trials/assets/tiny-mamba     # `embedded-tiny`: hidden 64, 149k
    python -m trials.pretrain --recipe tiny-mamba2                             # `embedded-mamba2`: hidden 64, 131k

Data present on every machine with Python 3.11 and scikit-learn, and disjoint from every downstream
validation and test example:
- text: standard-library source as bytes. The ``tiny`` corpus is a fixed list of 16 modules (STDLIB_FILES); the
  ``stdlib`` corpus is every pure-Python module of the standard library except the held-out ones
  (``stdlib_files``): the modules the stdlib tasks are made from (``trials.data.STDLIB_TASK_MODULES``, whole
  top-level packages), ``pydoc_data`` (the ``pydoc_topics`` task), tests, GUI and tooling packages;
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
from typing import Any

import numpy as np
import torch

from trials.data import (
    EMBEDDED_VOCAB_SIZE,
    PAD_ID,
    STDLIB_TASK_MODULES,
    ByteTokenizer,
    digit_tokens,
    digits_split_indices,
)
from trials.model import EMBEDDED_DEFAULT

STDLIB_FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "inspect.py",
                "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "random.py",
                "shutil.py", "statistics.py", "string.py", "textwrap.py", "typing.py", "subprocess.py")


# Never in the ``stdlib`` corpus: tests and demos, GUI and packaging tooling, codec tables, and pydoc_data (the
# pydoc_topics task); plus the top-level packages of STDLIB_TASK_MODULES (the stdlib tasks), added below.
EXCLUDED_DIRS = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "encodings",
                 "pydoc_data", "site-packages", "dist-packages", "__pycache__", "__phello__")
CORPORA = ("tiny", "stdlib")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_names() -> set[str]:
    """Top-level names (module or package) the ``stdlib`` corpus leaves out for the downstream tasks."""
    return {m.split(".")[0] for m in STDLIB_TASK_MODULES}


def stdlib_files(corpus: str = "stdlib") -> list[str]:
    """The corpus's files, relative to the standard-library directory, in a fixed order."""
    if corpus == "tiny":
        return list(STDLIB_FILES)
    if corpus != "stdlib":
        raise ValueError(f"--corpus: {corpus!r} is not one of {', '.join(CORPORA)}")
    root, held_out = stdlib_root(), held_out_names()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        top = parts[0].removesuffix(".py")
        if top in held_out or any(part in EXCLUDED_DIRS or part.startswith("config-") for part in parts):
            continue
        files.append(path.relative_to(root).as_posix())
    return files


def text_corpus(corpus: str = "stdlib") -> list[int]:
    root = stdlib_root()
    tok = ByteTokenizer()
    ids: list[int] = []
    for rel in stdlib_files(corpus):
        ids.extend(tok.encode((root / rel).read_text(encoding="utf-8", errors="replace")))
    return ids


def image_corpus(seed: int = 0) -> list[list[int]]:
    from sklearn.datasets import load_digits

    images = load_digits().images
    idx = digits_split_indices(seed)
    allowed = np.concatenate([idx["train"], idx["rest"]])  # never val or test
    return [digit_tokens(images[i]) for i in allowed]


def build_config(hidden: int, layers: int, state: int, arch: str = "mamba", head_dim: int = 16, groups: int = 1,
                 chunk: int = 16) -> Any:
    """A Mamba-1 (``arch`` mamba) or Mamba-2 (mamba2: ``2 * hidden / head_dim`` heads, ``groups`` B/C groups,
    SSD chunks of ``chunk`` tokens) config over the embedded vocabulary, embeddings tied to the output."""
    from transformers import Mamba2Config, MambaConfig

    tokens: dict[str, Any] = {"vocab_size": EMBEDDED_VOCAB_SIZE, "pad_token_id": PAD_ID, "bos_token_id": 1,
                              "eos_token_id": 2, "tie_word_embeddings": True}
    if arch == "mamba":
        return MambaConfig(hidden_size=hidden, state_size=state, num_hidden_layers=layers, expand=2, conv_kernel=4,
                           use_mambapy=True, **tokens)
    if arch == "mamba2":
        if (2 * hidden) % head_dim:
            raise ValueError(f"head_dim: {head_dim} does not divide the inner width 2 * {hidden}")
        return Mamba2Config(hidden_size=hidden, state_size=state, num_hidden_layers=layers, expand=2, conv_kernel=4,
                            num_heads=2 * hidden // head_dim, head_dim=head_dim, n_groups=groups, chunk_size=chunk,
                            **tokens)
    raise ValueError(f"arch: {arch!r} is not one of mamba, mamba2")


def batches(text: list[int], images: list[list[int]], batch: int, length: int, rng: random.Random,
            image_every: int = 2):
    """Text windows, and every ``image_every``-th row a digit image (padded to ``length`` with PAD, which the loss
    ignores)."""
    while True:
        rows, labels = [], []
        for b in range(batch):
            if b % image_every != image_every - 1:
                start = rng.randrange(0, len(text) - length)
                seq = text[start : start + length]
            else:
                seq = rng.choice(images)[:length]
            pad = length - len(seq)
            rows.append(seq + [PAD_ID] * pad)
            labels.append(seq + [-100] * pad)
        yield torch.tensor(rows), torch.tensor(labels)


def pretrain(out: Path, steps: int, batch: int, length: int, lr: float, hidden: int, layers: int,
             state: int, seed: int, log_every: int = 50, corpus: str = "tiny", image_every: int = 2,
             scan: str = "mambapy", name: str = "tiny-mamba", checkpoint: str = "embedded-tiny",
             recipe: str = "tiny", arch: str = "mamba", head_dim: int = 16, groups: int = 1,
             chunk: int = 16) -> dict:
    from transformers import AutoModelForCausalLM

    from trials.model import use_scan

    torch.manual_seed(seed)
    rng = random.Random(seed)
    text, images = text_corpus(corpus), image_corpus(seed)
    config = build_config(hidden, layers, state, arch, head_dim, groups, chunk)
    model = AutoModelForCausalLM.from_config(config)
    use_scan(model, scan)  # the same function on every path; `auto` is the fast CPU scan
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    t0 = time.time()
    losses: list[float] = []
    it = batches(text, images, batch, length, rng, image_every)
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
    if arch == "mamba2":
        info_arch = {"num_heads": config.num_heads, "head_dim": head_dim, "n_groups": groups, "chunk_size": chunk}
    else:
        info_arch = {}
    info = {"recipe": recipe, "name": name, "checkpoint": checkpoint, "corpus": corpus,
            "files": len(stdlib_files(corpus)),
            "image_every": image_every, "scan": scan, "threads": torch.get_num_threads(),
            "steps": steps, "batch_size": batch, "seq_len": length, "lr": lr, "seed": seed,
            "hidden_size": hidden, "num_hidden_layers": layers, "state_size": state, "arch": arch,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(losses[-log_every:])), "seconds": round(seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "text_bytes": len(text), "images": len(images), **info_arch}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    files = (", ".join(STDLIB_FILES) if info["corpus"] == "tiny" else
             "every pure-Python standard-library module except the held-out ones (`trials.pretrain.stdlib_files`): "
             "the top-level packages of `trials.data.STDLIB_TASK_MODULES` (" + ", ".join(sorted(held_out_names()))
             + "), and " + ", ".join(EXCLUDED_DIRS))
    share = "half" if info["image_every"] == 2 else f"1 in {info['image_every']}"
    default = ", which `embedded` means" if info["checkpoint"] == EMBEDDED_DEFAULT else ""
    # Cards written before the Mamba-2 recipe have no ``arch``: they are Mamba-1.
    mamba2 = info.get("arch", "mamba") == "mamba2"
    kind, cls = ("Mamba-2", "Mamba2ForCausalLM") if mamba2 else ("Mamba-1", "MambaForCausalLM")
    heads = (f", {info['num_heads']} heads x head_dim {info['head_dim']}, {info['n_groups']} group(s), SSD chunk "
             f"{info['chunk_size']}" if mamba2 else "")
    scan = "transformers' own path" if info["scan"] == "hf_loop" and mamba2 else f"scan `{info['scan']}`"
    return f"""# {info['name']}: an embedded pretrained {kind} of mamba-peft-search (`model.checkpoint: \
{info['checkpoint']}`{default})

A `{cls}` (hidden {info['hidden_size']}, {info['num_hidden_layers']} layers, state \
{info['state_size']}{heads}, vocab {EMBEDDED_VOCAB_SIZE}, {info['parameters']:,} parameters) pretrained by \
next-token prediction, so that PEFT adapts a model that has learnt something.

How it was made: `python -m trials.pretrain --recipe {info['recipe']} --out trials/assets/{info['name']}` (the \
recipe's settings are below; `trials/pretrain.py` holds them).

- Text: {info['seq_len']}-byte windows of the source of {info['files']} Python {info['python']} standard-library \
files ({info['text_bytes']:,} bytes): {files}.
- Images: {share} of the rows of each batch are {info['images']} scikit-learn 8x8 digit images read as 64 pixel \
tokens, unlabelled, drawn only from the `digits` task's training split and the images outside all splits.
- Held out: no validation or test example of any downstream task, no text of `pydoc_data.topics`, and no source \
of the modules the stdlib tasks are made from.
- Tokens: 0 pad, 1 cls, 2 sep, 3..258 bytes, 259..275 pixel levels 0..16 (`trials/data.py`).
- Schedule: {info['steps']} steps, batch {info['batch_size']}, AdamW lr {info['lr']} (5% warm-up, cosine), \
weight decay 0.01, gradient clip 1.0, seed {info['seed']}, fp32 on CPU (torch {info['torch']}, {scan}, \
{info['threads']} threads).
- Time: {info['seconds']} s. Final training loss (mean of the last 50 steps): {info['final_loss']:.3f} nats/token.
"""


# The embedded checkpoints: `tiny` is the original (mambapy scan, 16 files); `small` is the default `embedded`;
# `tiny-mamba2` is a Mamba-2 on the `tiny` corpus, small enough (head_dim 16, one group, chunk 16) to train in
# about five minutes on one core through transformers' own chunked-SSD torch path.
RECIPES: dict[str, dict] = {
    "tiny": {"name": "tiny-mamba", "checkpoint": "embedded-tiny", "corpus": "tiny", "steps": 1500, "batch": 32,
             "length": 64, "lr": 3e-3, "hidden": 64, "layers": 4, "state": 16, "image_every": 2,
             "scan": "mambapy"},
    "small": {"name": "small-mamba", "checkpoint": "embedded-small", "corpus": "stdlib", "steps": 4000, "batch": 32,
              "length": 128, "lr": 2e-3, "hidden": 128, "layers": 4, "state": 16, "image_every": 4,
              "scan": "auto"},
    "tiny-mamba2": {"name": "tiny-mamba2", "checkpoint": "embedded-mamba2", "corpus": "tiny", "steps": 1500,
                    "batch": 32, "length": 64, "lr": 3e-3, "hidden": 64, "layers": 4, "state": 16, "image_every": 2,
                    "scan": "hf_loop", "arch": "mamba2", "head_dim": 16, "groups": 1, "chunk": 16},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small")
    p.add_argument("--out", type=Path, help="default: trials/assets/<the recipe's name>")
    p.add_argument("--steps", type=int, help="override the recipe's step count (for a quick try)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = dict(RECIPES[a.recipe])
    if a.steps is not None:
        r["steps"] = a.steps
    out = a.out or Path(__file__).resolve().parent / "assets" / r["name"]
    info = pretrain(out, r["steps"], r["batch"], r["length"], r["lr"], r["hidden"], r["layers"], r["state"], a.seed,
                    corpus=r["corpus"], image_every=r["image_every"], scan=r["scan"], name=r["name"],
                    checkpoint=r["checkpoint"], recipe=a.recipe, arch=r.get("arch", "mamba"),
                    head_dim=r.get("head_dim", 16), groups=r.get("groups", 1), chunk=r.get("chunk", 16))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
