"""Reproducible pretraining recipes for the embedded checkpoints (Mamba-1, and a Mamba-2).

    python -m trials.pretraining.pretrain --recipe small --out trials/assets/small-mamba  # `embedded`: hidden 128
    python -m trials.pretraining.pretrain --recipe tiny --out trials/assets/tiny-mamba    # `embedded-tiny`: hidden 64
    python -m trials.pretraining.pretrain --recipe tiny-mamba2                            # `embedded-mamba2`: hidden 64

A larger corpus, ``stdlib+packages`` (the ``stdlib`` corpus plus the source and shipped docs of CORPUS_PACKAGES), is
built once on a machine with the project's lock installed and carried to where it trains (a GPU machine has
other site-packages):

    python -m trials.pretraining.pretrain --build-corpus stdlib+packages --corpus-out .gpu/corpus/stdlib+packages.xz
    python -m trials.pretraining.pretrain --recipe small-packages --device cuda --max-seconds 270 \
        --corpus-file .gpu/corpus/stdlib+packages.xz --out OUT/small-packages

Data present on every machine with Python 3.11 and scikit-learn, and disjoint from every downstream
validation and test example:
- text: standard-library source as bytes. The ``tiny`` corpus is a fixed list of 16 modules (STDLIB_FILES); the
  ``stdlib`` corpus is every pure-Python module of the standard library except the held-out ones
  (``stdlib_files``): the modules the stdlib tasks are made from (``trials.heldout.STDLIB_TASK_MODULES``, whole
  top-level packages), ``pydoc_data`` (the ``pydoc_topics`` task), tests, GUI and tooling packages;
- images: scikit-learn's 8x8 digits outside the ``digits`` task's validation and test splits, as unlabelled
  64-step pixel sequences (labels are never read).
The ``stdlib+packages`` corpus also drops every file that shares a 64-byte window (whitespace collapsed) with
``pydoc_data.topics`` or with a docstring summary or example of the stdlib tasks, or holds a shorter one whole
(``HeldOutText``). Those texts are the building Python's: the corpus records its version, and a run on another
Python says so.
The objective is next-token prediction. The output is a Hugging Face checkpoint directory
(``save_pretrained``, safetensors) with a card (README.md) saying how it was made.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import lzma
import math
import platform
import random
import sysconfig
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trials.heldout import (  # noqa: F401 (the corpus names, for this command's users)
    CORPORA,
    EXCLUDED_DIRS,
    STDLIB_FILES,
    STDLIB_TASK_MODULES,
    held_out_names,
    stdlib_files,
    stdlib_root,
    text_corpus,
)
from trials.models.loading import EMBEDDED_CHECKPOINTS, EMBEDDED_DEFAULT
from trials.models.vocab import BYTE_OFFSET, EMBEDDED_VOCAB_SIZE, PAD_ID
from trials.tasks.sources.digits import digit_tokens, digits_split_indices

# Built once by --build-corpus into one file (--corpus-file), since their text comes from installed packages.
BUILT_CORPORA = ("stdlib+packages",)


def image_corpus(seed: int = 0) -> list[list[int]]:
    from sklearn.datasets import load_digits

    images = load_digits().images
    idx = digits_split_indices(seed)
    allowed = np.concatenate([idx["train"], idx["rest"]])  # never val or test
    return [digit_tokens(images[i]) for i in allowed]


# --- the stdlib+packages corpus: built here, carried, read with --corpus-file ---------------------------------

# Packages of the ``stdlib+packages`` corpus, by import name, in this order: the docstring-rich libraries of the
# lock (numpydoc prose in the scientific stack; long English docstrings in SQLAlchemy, the web and tooling ones).
# Left out: transformers (54 MB, most of it near-identical model files), torch and sympy (40 and 16 MB, mostly
# code), mlflow, ray, plotly and streamlit (generated or UI code), pygments (lexer tables).
CORPUS_PACKAGES = (
    "numpy", "scipy", "sklearn", "pandas", "networkx", "matplotlib", "mpmath", "sqlalchemy", "huggingface_hub",
    "peft", "datasets", "accelerate", "pydantic", "optuna", "_pytest", "rich", "setuptools", "alembic", "fastapi",
    "werkzeug", "fsspec", "jinja2", "packaging", "typer", "click", "joblib", "flask", "dateutil", "starlette",
    "mako", "requests",
)
PACKAGE_SUFFIXES = (".py", ".rst", ".txt", ".md")
# Test suites (code, little prose), vendored copies of other projects, caches.
PACKAGE_EXCLUDED_DIRS = ("tests", "test", "testing", "__pycache__", "_vendor", "vendored", "externals")
MAX_FILE_BYTES = 1_000_000  # larger files are generated tables, not text
SHINGLE = 64  # a file sharing one window this long with held-out text is dropped
# A held-out piece shorter than SHINGLE is matched whole. Every piece is at least this long today (the shortest are
# 13-byte stdlib summaries such as "Does nothing."); a shorter one would be a common word or two, found in nearly
# every file, so it is left unchecked and counted in the manifest (``unchecked_pieces``) and the card.
MIN_PIECE = 8
VAL_EVERY = 200  # one file in 200 (by a hash of its path) is the held-out validation slice


def normalise_whitespace(data: bytes) -> np.ndarray:
    """``data`` as uint8 with every run of whitespace collapsed to one space (so re-wrapped text still matches)."""
    a = np.frombuffer(data, dtype=np.uint8).copy()
    space = np.isin(a, np.frombuffer(b" \t\n\r\x0b\x0c", dtype=np.uint8))
    a[space] = 32
    keep = ~(space & np.concatenate([[False], space[:-1]]))
    return a[keep]


_BASE = np.uint64(1_000_003)
_BASE_INV = np.uint64(pow(1_000_003, -1, 2**64))


def window_hashes(a: np.ndarray, w: int) -> np.ndarray:
    """Polynomial hashes (mod 2**64) of every ``w``-byte window of uint8 ``a``, position-independent.

    hash(a[i:i+w]) = sum_j a[j] B^(i+w-1-j) = B^(i+w-1) * (P[i+w] - P[i]) with P the prefix sums of a[j] B^-j,
    so it is a handful of vectorised ops (uint64 arithmetic wraps, which is the modulus)."""
    n = len(a)
    if n < w:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        inv = np.cumprod(np.full(n, _BASE_INV, dtype=np.uint64)) * _BASE  # B^-j, j = 0..n-1
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(a.astype(np.uint64) * inv, dtype=np.uint64)])
        powers = np.cumprod(np.full(n, _BASE, dtype=np.uint64)) * _BASE_INV  # B^j
        return (prefix[w:] - prefix[:-w]) * powers[w - 1 :]


def held_out_pieces() -> list[str]:
    """Every text the downstream text tasks are made of: ``pydoc_data.topics`` whole (every topic; pydoc_topics'
    windows depend on the seed), and each stdlib function's summary and stdlib_modules text (the rows of
    stdlib_docstrings, stdlib_functions and stdlib_modules in every split of every seed)."""
    from pydoc_data.topics import topics

    from trials.tasks.sources.stdlib import stdlib_functions, stdlib_module_examples

    pieces = [topics[name] for name in sorted(topics)]
    pieces += [f.summary for f in stdlib_functions()]
    pieces += [t for texts in stdlib_module_examples().values() for t in texts]
    return pieces


class HeldOutText:
    """Finds held-out text in a file: a shared SHINGLE-byte window of any piece, or a whole piece of MIN_PIECE to
    SHINGLE - 1 bytes (found by the hash of its first MIN_PIECE bytes, then compared), after whitespace is collapsed
    on both sides. Pieces under MIN_PIECE bytes are not checked (``unchecked``)."""

    def __init__(self, pieces: Sequence[str]) -> None:
        long_hashes: list[np.ndarray] = []
        self.short: dict[int, set[bytes]] = {}  # hash of a short piece's first MIN_PIECE bytes -> the pieces
        self.unchecked: list[str] = []
        self.pieces = len(pieces)
        for piece in pieces:
            a = normalise_whitespace(piece.strip().encode("utf-8"))
            if len(a) >= SHINGLE:
                long_hashes.append(window_hashes(a, SHINGLE))
            elif len(a) >= MIN_PIECE:
                self.short.setdefault(int(window_hashes(a[:MIN_PIECE], MIN_PIECE)[0]), set()).add(a.tobytes())
            else:
                self.unchecked.append(piece)
        self.long = np.unique(np.concatenate(long_hashes)) if long_hashes else np.zeros(0, dtype=np.uint64)
        self.prefixes = np.array(sorted(self.short), dtype=np.uint64)

    @staticmethod
    def _member(hashes: np.ndarray, table: np.ndarray) -> np.ndarray:
        if not len(table) or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        at = np.minimum(np.searchsorted(table, hashes), len(table) - 1)
        return table[at] == hashes

    def found(self, data: bytes) -> bool:
        a = normalise_whitespace(data)
        if self._member(window_hashes(a, SHINGLE), self.long).any():
            return True
        text = a.tobytes()
        prefixes = window_hashes(a, MIN_PIECE)
        for i in np.flatnonzero(self._member(prefixes, self.prefixes)):
            if any(text.startswith(piece, int(i)) for piece in self.short[int(prefixes[i])]):
                return True
        return False


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def package_files(package: str, site: Path) -> list[Path]:
    """A package's text files in sorted order: PACKAGE_SUFFIXES, no test or vendored folders, no test_*.py."""
    root = site / package
    if not root.is_dir():
        raise FileNotFoundError(f"CORPUS_PACKAGES: {package!r} is not installed in {site}")
    files = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(site).parts
        if (path.suffix in PACKAGE_SUFFIXES and path.is_file() and not path.name.startswith("test_")
                and not any(part in PACKAGE_EXCLUDED_DIRS for part in parts)):
            files.append(path)
    return files


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Import name -> "distribution==version", as installed (``make lock`` pins them in requirements.lock)."""
    dists = importlib.metadata.packages_distributions()
    out = {}
    for package in packages:
        found = dists.get(package)
        out[package] = f"{found[0]}=={importlib.metadata.version(found[0])}" if found else f"{package} (no metadata)"
    return out


def is_validation_file(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % VAL_EVERY == 0


def build_corpus(corpus: str, out: Path, packages: Sequence[str] = CORPUS_PACKAGES,
                 site: Path | None = None, held_out: HeldOutText | None = None,
                 stdlib: Sequence[str] | None = None) -> dict:
    """Write ``out`` (the files' bytes concatenated, xz-compressed) and ``out`` + ``.json`` (the manifest: every
    file with its bytes, sha256 and split, what was dropped and why, package versions); return the manifest.

    Files are the ``stdlib`` corpus (``stdlib/<path>``) then each package's (``<package>/<path>``), in sorted
    order; a file is dropped when it is not UTF-8, is larger than MAX_FILE_BYTES, repeats an earlier file exactly,
    or contains held-out text (``HeldOutText``). The validation slice is VAL_EVERY's files, or the last file when
    that picks none. ``stdlib`` replaces the ``stdlib`` corpus's file list (tests)."""
    if corpus not in BUILT_CORPORA:
        raise ValueError(f"--build-corpus: {corpus!r} is not one of {', '.join(BUILT_CORPORA)}")
    site = site or site_packages()
    held_out = held_out or HeldOutText(held_out_pieces())
    sources = [(f"stdlib/{rel}", stdlib_root() / rel) for rel in (stdlib_files("stdlib") if stdlib is None else stdlib)]
    for package in packages:
        sources += [(path.relative_to(site).as_posix(), path) for path in package_files(package, site)]
    dropped: dict[str, list[str]] = {"held_out": [], "duplicate": [], "not_utf8": [], "too_large": []}
    files, seen, blob = [], set(), []
    for name, path in sources:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        try:
            data.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            utf8 = False
        reason = ("too_large" if len(data) > MAX_FILE_BYTES else "not_utf8" if not utf8
                  else "duplicate" if digest in seen else "held_out" if held_out.found(data) else None)
        if reason:
            dropped[reason].append(name)
            continue
        seen.add(digest)
        files.append({"name": name, "bytes": len(data), "sha256": digest,
                      "split": "val" if is_validation_file(name) else "train"})
        blob.append(data)
    if files and not any(f["split"] == "val" for f in files):
        files[-1]["split"] = "val"  # a small corpus still has a validation slice
    data = b"".join(blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(data, preset=9))
    manifest = {"corpus": corpus, "python": platform.python_version(), "packages": package_versions(packages),
                "shingle": SHINGLE, "min_piece": MIN_PIECE, "held_out_pieces": held_out.pieces,
                "unchecked_pieces": len(held_out.unchecked), "val_every": VAL_EVERY, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "compressed_bytes": out.stat().st_size,
                "dropped": {k: len(v) for k, v in dropped.items()}, "dropped_files": dropped, "files": files}
    manifest_path(out).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def manifest_path(corpus_file: Path) -> Path:
    return corpus_file.with_name(corpus_file.name + ".json")


@dataclass(frozen=True)
class ByteCorpus:
    """A built corpus as bytes: ``train`` and ``val`` (whole files, VAL_EVERY) uint8 arrays, and its manifest."""

    train: np.ndarray
    val: np.ndarray
    manifest: dict


def load_corpus_file(path: Path) -> ByteCorpus:
    """The corpus written by ``build_corpus``, checked against its manifest's sha256.

    Read on another Python than the one it was built on, it warns and still loads: its held-out filter is the
    building Python's (``pydoc_data.topics`` and the docstrings the stdlib tasks are made of), which holds out the
    tasks as long as they are built on that Python too (the intended use: built and evaluated on 3.11, trained on a
    GPU machine's 3.12)."""
    manifest = json.loads(manifest_path(path).read_text())
    data = lzma.decompress(path.read_bytes())
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"--corpus-file {path}: its bytes do not match the sha256 in {manifest_path(path)}")
    here = platform.python_version()
    if manifest["python"] != here:
        warnings.warn(f"--corpus-file {path}: built on Python {manifest['python']}, read on Python {here}. Its "
                      f"held-out filter used Python {manifest['python']}'s pydoc_data.topics and stdlib docstrings: "
                      f"downstream tasks built on Python {manifest['python']} stay held out, tasks built on another "
                      "Python may hold text the filter never saw (the card records both versions)", stacklevel=2)
    a = np.frombuffer(data, dtype=np.uint8)
    ends = np.cumsum([f["bytes"] for f in manifest["files"]])
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for f, end in zip(manifest["files"], ends, strict=True):
        parts[f["split"]].append(a[end - f["bytes"] : end])
    return ByteCorpus(np.concatenate(parts["train"]), np.concatenate(parts["val"]), manifest)


def byte_batches(text: torch.Tensor, images: torch.Tensor, batch: int, length: int, seed: int,
                 image_every: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` without Python per byte: text [T] uint8 and images [n, 64] token ids, both on the device the
    batches are for; windows drawn by a numpy generator (the same on every device)."""
    rng = np.random.default_rng(seed)
    device = text.device
    offsets = torch.arange(length, device=device)  # [L]
    image_rows = torch.arange(image_every - 1, batch, image_every, device=device)  # [Bi]
    text_rows = torch.tensor([b for b in range(batch) if b % image_every != image_every - 1], device=device)
    width = min(length, images.shape[1])
    while True:
        starts = torch.from_numpy(rng.integers(0, len(text) - length, size=len(text_rows))).to(device)  # [Bt]
        picks = torch.from_numpy(rng.integers(0, len(images), size=len(image_rows))).to(device)  # [Bi]
        x = torch.full((batch, length), PAD_ID, dtype=torch.long, device=device)  # [B, L]
        x[text_rows] = text[starts[:, None] + offsets].long() + BYTE_OFFSET
        x[image_rows, :width] = images[picks, :width]
        y = x.masked_fill(x == PAD_ID, -100)  # pad is never a byte or pixel token
        yield x, y


@torch.no_grad()
def validation_loss(model: Any, val: torch.Tensor, length: int, batch: int, max_windows: int) -> tuple[float, int]:
    """Mean next-byte loss (nats/byte) over the first ``max_windows`` non-overlapping ``length``-byte windows of
    ``val``, and how many bytes were predicted."""
    n = min(max_windows, len(val) // length)
    if n < 1:
        raise ValueError(f"validation loss: the validation slice has {len(val)} bytes and max_windows is "
                         f"{max_windows}, not one {length}-byte window to score")
    windows = val[: n * length].view(n, length).long() + BYTE_OFFSET  # [n, L]
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        # No generation cache: with one, the mixer defers to transformers' slow cached path.
        total += float(model(input_ids=x, labels=x, use_cache=False).loss) * x.shape[0]
    model.train()
    return total / n, n * (length - 1)


def scan_path(device: str, scan: str = "auto") -> str:
    """Which selective scan a Mamba-1 with ``scan`` runs on ``device``: transformers' own paths for ``mambapy`` and
    ``hf_loop``; on CUDA with ``auto`` mamba-ssm's fused kernel where it can run (CUDA tensors never take the compiled
    kernel, C on CPU memory), else ``trials.models.scan``'s torch recurrence."""
    if scan in ("mambapy", "hf_loop"):
        return f"transformers' {scan} path"
    if device == "cuda":
        from trials.models import fused

        if scan == "auto" and fused.mamba1_kernel()[0] is not None:
            return "mamba-ssm fused kernel"
        return "torch recurrence (trials.models.scan)"
    from trials.models.scan import resolve_impl

    return f"{resolve_impl(scan)} (trials.models.scan)"  # type: ignore[arg-type]


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


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def _optimizer(model: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))


def _train_step(model: Any, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    loss = model(input_ids=x, labels=y).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_loop(model: Any, it: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float, log_every: int,
               device: str = "cpu") -> tuple[float, float]:
    """``steps`` AdamW steps under the warm-up and cosine schedule, logging every ``log_every``; returns the mean
    loss of the last ``log_every`` steps and the seconds it took."""
    opt = _optimizer(model, lr)
    sched = _schedule(opt, steps)
    t0 = time.time()
    losses: list[torch.Tensor] = []
    for step in range(steps):
        losses.append(_train_step(model, opt, next(it)))
        sched.step()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {torch.stack(losses[-log_every:]).mean().item():.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    # float64 mean of the per-step losses, as pretrain.json has always recorded it (not a float32 torch mean).
    final_loss = float(np.mean([loss.item() for loss in losses[-log_every:]]))
    _sync(device)
    return final_loss, time.time() - t0


def steps_that_fit(max_seconds: float, t_begin: float, timed_step: float, val_batches: int) -> int:
    """How many training steps of ``timed_step`` seconds fit in what is left of ``max_seconds`` since ``t_begin``,
    after ``val_batches`` validation forwards (a forward is ~1/3 of a step) and a 3% margin; at least one."""
    left = max_seconds - (time.time() - t_begin) - val_batches * timed_step / 2
    return max(1, int(0.97 * left / timed_step))


def seconds_per_step(model: Any, it: Iterator[tuple[torch.Tensor, torch.Tensor]], lr: float, device: str,
                     timed: int = 30, warmup: int = 5) -> float:
    """Training-step time measured on a copy of ``model`` (its own optimizer and batches), so the run itself is the
    same as one started with ``--steps``."""
    probe = copy.deepcopy(model)
    opt = _optimizer(probe, lr)
    t0 = 0.0
    for i in range(warmup + timed):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        _train_step(probe, opt, next(it))
    _sync(device)
    return (time.perf_counter() - t0) / timed


def pretrain(out: Path, steps: int, batch: int, length: int, lr: float, hidden: int, layers: int,
             state: int, seed: int, log_every: int = 50, corpus: str = "tiny", image_every: int = 2,
             scan: str = "mambapy", name: str = "tiny-mamba", checkpoint: str = "embedded-tiny",
             recipe: str = "tiny", arch: str = "mamba", head_dim: int = 16, groups: int = 1,
             chunk: int = 16, device: str = "cpu", corpus_file: Path | None = None,
             max_seconds: float | None = None, timed_steps: int = 30, val_windows: int = 512) -> dict:
    """Train and save a checkpoint. A BUILT_CORPORA corpus is read from ``corpus_file`` and sampled on ``device``
    (``byte_batches``), with the validation loss of its held-out files reported at the end; ``max_seconds`` replaces
    ``steps`` by the count that fits (loading, timing, training and validation, from this call on)."""
    from transformers import AutoModelForCausalLM

    from trials.models.loading import use_scan

    t_begin = time.time()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    built: ByteCorpus | None = None
    if corpus in BUILT_CORPORA:
        if corpus_file is None:
            raise ValueError(f"corpus {corpus!r} is read from a file: build it with `python -m "
                             f"trials.pretraining.pretrain --build-corpus {corpus} --corpus-out PATH`, then pass "
                             "--corpus-file PATH")
        built = load_corpus_file(corpus_file)
        if built.manifest["corpus"] != corpus:
            raise ValueError(f"--corpus-file {corpus_file}: holds corpus {built.manifest['corpus']!r}, the recipe "
                             f"needs {corpus!r}")
        if len(built.val) < length or val_windows < 1:  # checked before training, not after it
            raise ValueError(f"--corpus-file {corpus_file}: its validation slice has {len(built.val)} bytes, not one "
                             f"{length}-byte window (val_windows {val_windows})")
    text = [] if built is not None else text_corpus(corpus)
    images = image_corpus(seed)
    config = build_config(hidden, layers, state, arch, head_dim, groups, chunk)
    model = AutoModelForCausalLM.from_config(config)  # initialised on CPU: the same weights on every device
    use_scan(model, scan)  # the same function on every path; `auto` is the fast CPU scan, on CUDA see scan_path
    model.to(device)
    if built is not None:
        text_t = torch.from_numpy(built.train.copy()).to(device)  # [T] uint8
        images_t = torch.tensor(images, dtype=torch.long, device=device)  # [n, 64]
        it = byte_batches(text_t, images_t, batch, length, seed, image_every)
    else:
        it = batches(text, images, batch, length, rng, image_every)
    timed_step = None
    if max_seconds is not None:
        probe_it = (byte_batches(text_t, images_t, batch, length, seed + 1, image_every) if built is not None
                    else batches(text, images, batch, length, random.Random(seed + 1), image_every))
        timed_step = seconds_per_step(model, probe_it, lr, device, timed_steps)
        val_batches = math.ceil(val_windows / batch) if built is not None else 0
        steps = steps_that_fit(max_seconds, t_begin, timed_step, val_batches)
        print(f"--max-seconds {max_seconds:g}: {timed_step * 1000:.1f} ms/step over {timed_steps} steps, "
              f"{time.time() - t_begin:.0f} s spent; training {steps} steps (reproduce with --steps {steps})",
              flush=True)
    final_loss, seconds = train_loop(model, it, steps, lr, log_every, device)
    val: dict[str, Any] = {}
    if built is not None:
        val_loss, val_bytes = validation_loss(model, torch.from_numpy(built.val.copy()).to(device), length, batch,
                                              val_windows)
        val = {"val_loss": round(val_loss, 4), "val_bytes": val_bytes}
        print(f"validation loss {val_loss:.4f} nats/byte over {val_bytes:,} held-out bytes", flush=True)
    model.to("cpu")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if arch == "mamba2":
        info_arch = {"num_heads": config.num_heads, "head_dim": head_dim, "n_groups": groups, "chunk_size": chunk}
    else:
        info_arch = {}
    if built is not None:
        m = built.manifest
        info_corpus = {"files": sum(f["split"] == "train" for f in m["files"]),
                       "val_files": sum(f["split"] == "val" for f in m["files"]), "text_bytes": len(built.train),
                       "corpus_file": str(corpus_file) if corpus_file else None, "corpus_sha256": m["sha256"],
                       "corpus_python": m["python"], "packages": m["packages"], "dropped": m["dropped"],
                       "min_piece": m["min_piece"], "unchecked_pieces": m.get("unchecked_pieces")}
    else:
        info_corpus = {"files": len(stdlib_files(corpus)), "text_bytes": len(text)}
    info_device: dict[str, Any] = {}
    if device != "cpu" or built is not None or max_seconds is not None:
        info_device = {"device": device, "device_name": (torch.cuda.get_device_name() if device == "cuda"
                                                         else platform.processor() or platform.machine()),
                       "scan_path": scan_path(device, scan)}
        if timed_step is not None:
            info_device.update(max_seconds=max_seconds, timed_ms_per_step=round(timed_step * 1000, 2),
                               total_seconds=round(time.time() - t_begin, 1))
    info = {"recipe": recipe, "name": name, "checkpoint": checkpoint, "corpus": corpus,
            "image_every": image_every, "scan": scan, "threads": torch.get_num_threads(),
            "steps": steps, "batch_size": batch, "seq_len": length, "lr": lr, "seed": seed,
            "hidden_size": hidden, "num_hidden_layers": layers, "state_size": state, "arch": arch,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": final_loss, "seconds": round(seconds, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "images": len(images), **info_corpus, **val, **info_device, **info_arch}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict) -> str:
    files = (", ".join(STDLIB_FILES) if info["corpus"] == "tiny" else
             "every pure-Python standard-library module except the held-out ones (`trials.heldout.stdlib_files`): "
             "the top-level packages of `trials.heldout.STDLIB_TASK_MODULES` (" + ", ".join(sorted(held_out_names()))
             + "), and " + ", ".join(EXCLUDED_DIRS))
    share = "half" if info["image_every"] == 2 else f"1 in {info['image_every']}"
    default = ", which `embedded` means" if info["checkpoint"] == EMBEDDED_DEFAULT else ""
    # Cards written before the Mamba-2 recipe have no ``arch``: they are Mamba-1.
    mamba2 = info.get("arch", "mamba") == "mamba2"
    kind, cls = ("Mamba-2", "Mamba2ForCausalLM") if mamba2 else ("Mamba-1", "MambaForCausalLM")
    heads = (f", {info['num_heads']} heads x head_dim {info['head_dim']}, {info['n_groups']} group(s), SSD chunk "
             f"{info['chunk_size']}" if mamba2 else "")
    scan = "transformers' own path" if info["scan"] == "hf_loop" and mamba2 else f"scan `{info['scan']}`"
    shipped = info["checkpoint"] in EMBEDDED_CHECKPOINTS
    where = f"trials/assets/{info['name']}" if shipped else "OUT"
    text = (f"the source of {info['files']} Python {info['python']} standard-library files "
            f"({info['text_bytes']:,} bytes): {files}")
    if info["corpus"] in BUILT_CORPORA:
        dropped = info["dropped"]
        unchecked = "unknown" if info.get("unchecked_pieces") is None else info["unchecked_pieces"]
        text = (f"the `{info['corpus']}` corpus (`--corpus-file {info['corpus_file']}`, sha256 "
                f"{info['corpus_sha256'][:16]}..., built by `python -m trials.pretraining.pretrain --build-corpus "
                f"{info['corpus']}` on Python {info['corpus_python']}, trained on Python {info['python']}): "
                f"{info['files']:,} training files, {info['text_bytes']:,} bytes. They are the `stdlib` corpus ("
                + files + ") and the .py, .rst, .txt and .md files of these installed packages, without test or "
                "vendored folders: " + ", ".join(info["packages"].values()) + f". Dropped: {dropped['held_out']} "
                f"files holding held-out text (a {SHINGLE}-byte window of `pydoc_data.topics` or of a stdlib task's "
                f"text, or the whole of a shorter one of at least {info['min_piece']} bytes, whitespace collapsed; "
                f"{unchecked} pieces are shorter and left unchecked), {dropped['duplicate']} exact duplicates, "
                f"{dropped['too_large']} over {MAX_FILE_BYTES:,} bytes, {dropped['not_utf8']} not UTF-8. "
                f"{info['val_files']} further files (one in {VAL_EVERY}, by a hash of the path) are the validation "
                "slice")
        if info["corpus_python"] != info["python"]:
            text += (f". The held-out filter is Python {info['corpus_python']}'s `pydoc_data.topics` and stdlib "
                     f"docstrings: it holds out the downstream tasks built on Python {info['corpus_python']}, not "
                     f"necessarily those built on this run's Python {info['python']}")
    if "device" in info:
        where_run = (f"fp32 on {info['device_name']} ({info['device']}; torch {info['torch']}, {scan}: "
                     f"{info['scan_path']})")
    else:
        where_run = f"fp32 on CPU (torch {info['torch']}, {scan}, {info['threads']} threads)"
    how = f"python -m trials.pretraining.pretrain --recipe {info['recipe']} --out {where}"
    if info["corpus"] in BUILT_CORPORA:
        how += f" --corpus-file {info['corpus_file']} --device {info['device']} --steps {info['steps']}"
    if info["seed"] != 0:
        how += f" --seed {info['seed']}"
    recipe = RECIPES.get(info["recipe"], {})
    for key, flag in (("batch", "batch_size"), ("length", "seq_len")):
        if key in recipe and recipe[key] != info[flag]:
            how += f" --{key} {info[flag]}"
    timing = ""
    if "max_seconds" in info:
        timing = (f" The step count was chosen by `--max-seconds {info['max_seconds']:g}` from "
                  f"{info['timed_ms_per_step']} ms per timed step; `--steps {info['steps']}` repeats the run.")
    val = (f" Validation loss on the held-out files: {info['val_loss']:.4f} nats/byte over {info['val_bytes']:,} "
           "bytes." if "val_loss" in info else "")
    use = (f"`model.checkpoint: {info['checkpoint']}`{default}" if shipped else
           "`model.checkpoint: <this directory>`")
    return f"""# {info['name']}: an embedded pretrained {kind} of mamba-peft-search ({use})

A `{cls}` (hidden {info['hidden_size']}, {info['num_hidden_layers']} layers, state \
{info['state_size']}{heads}, vocab {EMBEDDED_VOCAB_SIZE}, {info['parameters']:,} parameters) pretrained by \
next-token prediction, so that PEFT adapts a model that has learnt something.

How it was made: `{how}` (the recipe's settings are below; `trials/pretraining/pretrain.py` holds them).

- Text: {info['seq_len']}-byte windows of {text}.
- Images: {share} of the rows of each batch are {info['images']} scikit-learn 8x8 digit images read as 64 pixel \
tokens, unlabelled, drawn only from the `digits` task's training split and the images outside all splits.
- Held out: no validation or test example of any downstream task, no text of `pydoc_data.topics`, and no source \
of the modules the stdlib tasks are made from.
- Tokens: 0 pad, 1 cls, 2 sep, 3..258 bytes, 259..275 pixel levels 0..16 (`trials/models/vocab.py`).
- Schedule: {info['steps']} steps, batch {info['batch_size']}, AdamW lr {info['lr']} (5% warm-up, cosine), \
weight decay 0.01, gradient clip 1.0, seed {info['seed']}, {where_run}.
- Time: {info['seconds']} s. Final training loss (mean of the last 50 steps): {info['final_loss']:.3f} \
nats/token.{timing}{val}
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
    # The `small` architecture (trials no slower) on 13x the text, sized for a GPU: 256 x 256 bytes a step (the
    # torch recurrence costs ~L kernel launches per layer whatever the batch, so a wide batch is nearly free), one
    # row in 8 a digit image (a padded image row wastes 3/4 of its positions). `steps` is for a run without
    # --max-seconds; the card of a timed run states its count.
    "small-packages": {"name": "small-mamba-packages", "checkpoint": "embedded-small-packages",
                       "corpus": "stdlib+packages", "steps": 8000, "batch": 256, "length": 256, "lr": 3e-3,
                       "hidden": 128, "layers": 4, "state": 16, "image_every": 8, "scan": "auto"},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small")
    p.add_argument("--out", type=Path, help="default: trials/assets/<the recipe's name>")
    p.add_argument("--steps", type=int, help="override the recipe's step count (for a quick try)")
    p.add_argument("--batch", type=int, help="override the recipe's batch size")
    p.add_argument("--length", type=int, help="override the recipe's window length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan", choices=("auto", "torch", "mambapy"), help="override the recipe's scan (the same "
                   "model either way; on CUDA without mamba-ssm, mambapy's parallel scan can be the faster)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--corpus-file", type=Path, help="a corpus written by --build-corpus (recipes on "
                   + ", ".join(BUILT_CORPORA) + ")")
    p.add_argument("--max-seconds", type=float, help="time the first steps, then train as many as fit (replaces "
                   "the step count; the card states it)")
    p.add_argument("--build-corpus", choices=BUILT_CORPORA, help="write this corpus to --corpus-out and exit")
    p.add_argument("--corpus-out", type=Path)
    a = p.parse_args(argv)
    if a.build_corpus:
        if a.corpus_out is None:
            p.error("--build-corpus needs --corpus-out PATH")
        manifest = build_corpus(a.build_corpus, a.corpus_out)
        print(json.dumps({k: v for k, v in manifest.items() if k not in ("files", "dropped_files")}, indent=2))
        print(f"{len(manifest['files'])} files; dropped for held-out text: "
              + ", ".join(manifest["dropped_files"]["held_out"]))
        return
    r = dict(RECIPES[a.recipe])
    for key in ("steps", "batch", "length", "scan"):
        if getattr(a, key) is not None:
            r[key] = getattr(a, key)
    out = a.out or Path(__file__).resolve().parent.parent / "assets" / r["name"]
    info = pretrain(out, r["steps"], r["batch"], r["length"], r["lr"], r["hidden"], r["layers"], r["state"], a.seed,
                    corpus=r["corpus"], image_every=r["image_every"], scan=r["scan"], name=r["name"],
                    checkpoint=r["checkpoint"], recipe=a.recipe, arch=r.get("arch", "mamba"),
                    head_dim=r.get("head_dim", 16), groups=r.get("groups", 1), chunk=r.get("chunk", 16),
                    device=a.device, corpus_file=a.corpus_file, max_seconds=a.max_seconds)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
