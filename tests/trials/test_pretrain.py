"""The stdlib+packages corpus (built here, carried), its held-out filter, the vectorised loader and a timed run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import small_trial_yaml
from trials import pretrain
from trials.data import BYTE_OFFSET, PAD_ID, PIXEL_OFFSET, PYDOC_TOPICS, load_stdlib_modules_task

BUILT = Path(__file__).resolve().parents[2] / ".gpu" / "corpus" / "stdlib+packages.xz"


@pytest.fixture(scope="module")
def held_out():
    return pretrain.HeldOutText(pretrain.held_out_pieces())


def _topic_window(name: str, start: int) -> str:
    from pydoc_data.topics import topics

    return topics[name][start : start + 300]


def _heldout_split_texts() -> list[str]:
    task = load_stdlib_modules_task(seed=0, shots_per_class=10)
    rows = [(r, n) for split in (task.val, task.test) for r, n in zip(split.ids, split.lengths, strict=True)]
    return [bytes(int(t) - BYTE_OFFSET for t in r[:n]).decode("utf-8") for r, n in rows]


def test_window_hashes_are_the_same_for_the_same_bytes_anywhere():
    a = np.frombuffer(b"the quick brown fox. the quick brown fox!", dtype=np.uint8)
    h = pretrain.window_hashes(a, 19)
    assert len(h) == len(a) - 18 and h[0] == h[21] and len(set(h.tolist())) == len(h) - 1
    one = pretrain.window_hashes(a[21:40], 19)
    assert one.tolist() == [h[21]]


def test_held_out_text_is_found_rewrapped_and_a_clean_file_is_not(held_out):
    rewrapped = _topic_window("compound", 2000).replace(" ", "\n        ")  # indented into a docstring
    assert held_out.found(f'def f():\n    """{rewrapped}"""\n'.encode())
    for text in _heldout_split_texts()[::10]:
        summary = text.split("): ", 1)[1]
        if len(summary) >= pretrain.MIN_PIECE:
            assert held_out.found(f"    # {summary}\n".encode()), summary
    assert not held_out.found(b"def add(a, b):\n    '''Add two numbers of the same kind.'''\n    return a + b\n")


def _fake_site(root: Path) -> Path:
    site = root / "site"
    (site / "pkg" / "tests").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text('"""A clean package: nothing held out here."""\n' * 20)
    (site / "pkg" / "copy.py").write_text('"""A clean package: nothing held out here."""\n' * 20)  # a duplicate
    (site / "pkg" / "leak.py").write_text(f'"""{_topic_window("specialnames", 5000)}"""\n')
    (site / "pkg" / "notes.rst").write_text("Some prose about the package, in reStructuredText.\n" * 40)
    (site / "pkg" / "tests" / "test_pkg.py").write_text("def test_x():\n    assert True\n")
    (site / "pkg" / "data.bin").write_bytes(b"\x00\x01")
    return site


def test_building_the_corpus_drops_a_file_that_puts_held_out_text_back(tmp_path, held_out):
    site = _fake_site(tmp_path)
    out = tmp_path / "corpus.xz"
    m = pretrain.build_corpus("stdlib+packages", out, packages=["pkg"], site=site, held_out=held_out,
                              stdlib=["typing.py", "string.py"])
    names = [f["name"] for f in m["files"]]
    assert names == ["stdlib/typing.py", "stdlib/string.py", "pkg/__init__.py", "pkg/notes.rst"]
    assert [f["split"] for f in m["files"]] == ["train", "train", "train", "val"]  # no path in the 1/200: the last
    assert m["dropped_files"]["held_out"] == ["pkg/leak.py"] and m["dropped_files"]["duplicate"] == ["pkg/copy.py"]
    loaded = pretrain.load_corpus_file(out)
    assert len(loaded.train) + len(loaded.val) == m["bytes"] == sum(f["bytes"] for f in m["files"])
    manifest = json.loads(pretrain.manifest_path(out).read_text())
    pretrain.manifest_path(out).write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="do not match the sha256"):
        pretrain.load_corpus_file(out)


def test_the_validation_slice_is_whole_files_chosen_by_path():
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    val = [n for n in names if pretrain.is_validation_file(n)]
    assert 5 <= len(val) <= 40 and val == [n for n in names if pretrain.is_validation_file(n)]


def test_byte_batches_are_windows_of_the_text_with_every_nth_row_an_image():
    text = torch.from_numpy(np.frombuffer(bytes(range(256)) * 8, dtype=np.uint8).copy())
    images = torch.full((5, 64), PIXEL_OFFSET + 3, dtype=torch.long)
    x, y = next(pretrain.byte_batches(text, images, batch=8, length=96, seed=0, image_every=4))
    assert x.shape == y.shape == (8, 96)
    for b in range(8):
        if b % 4 == 3:
            assert (x[b, :64] == PIXEL_OFFSET + 3).all() and (x[b, 64:] == PAD_ID).all() and (y[b, 64:] == -100).all()
        else:
            row = x[b] - BYTE_OFFSET  # consecutive bytes of the text
            assert (torch.diff(row) % 256 == 1).all() and torch.equal(x[b], y[b])
    again = next(pretrain.byte_batches(text, images, batch=8, length=96, seed=0, image_every=4))[0]
    assert torch.equal(x, again)


def test_a_timed_run_on_a_built_corpus_writes_a_checkpoint_a_trial_loads_by_path(tmp_path, held_out):
    from space.config import TrialConfig
    from trials.run import run_trial

    corpus = tmp_path / "corpus.xz"
    site = _fake_site(tmp_path)
    stdlib = pretrain.stdlib_files("tiny")
    pretrain.build_corpus("stdlib+packages", corpus, packages=["pkg"], site=site, held_out=held_out, stdlib=stdlib)
    out = tmp_path / "ckpt"
    info = pretrain.pretrain(out, steps=1000, batch=4, length=32, lr=3e-3, hidden=16, layers=2, state=4, seed=0,
                             log_every=2, corpus="stdlib+packages", image_every=4, scan="auto", name="t",
                             checkpoint="not-shipped", recipe="small-packages", corpus_file=corpus,
                             max_seconds=3.0, timed_steps=3, val_windows=8)
    assert 1 <= info["steps"] < 1000 and info["timed_ms_per_step"] > 0 and info["val_loss"] > 0
    card = (out / "README.md").read_text()
    assert f"--steps {info['steps']}" in card and "model.checkpoint: <this directory>" in card
    assert "Validation loss" in card and "numpy" not in card  # the packages the corpus was built from
    result = run_trial(TrialConfig.from_yaml(small_trial_yaml(steps=2, eval_every=2, checkpoint=str(out))),
                       report=lambda r: None)
    assert 0.0 <= result.val_accuracy <= 1.0


@pytest.mark.skipif(not BUILT.exists(), reason="the stdlib+packages corpus is built locally (.gpu/corpus)")
def test_the_built_corpus_holds_no_held_out_text():
    from pydoc_data.topics import topics

    corpus = pretrain.load_corpus_file(BUILT)
    text = pretrain.normalise_whitespace(np.concatenate([corpus.train, corpus.val]).tobytes()).tobytes()
    rng = random.Random(0)
    for name in PYDOC_TOPICS:
        body = " ".join(topics[name].split())
        for start in rng.sample(range(len(body) - 96), 5):
            assert body[start : start + 96].encode() not in text, name
    summaries = {t.split("): ", 1)[1] for t in _heldout_split_texts()}
    assert not [s for s in summaries if len(s) >= pretrain.MIN_PIECE and s.encode() in text]
    names = [f["name"] for f in corpus.manifest["files"]]
    assert not [n for n in names if "pydoc_data" in n]
    assert corpus.manifest["dropped"]["held_out"] > 0 and len(corpus.val) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_equal_those_on_cpu_and_a_step_trains():
    text = torch.from_numpy(np.frombuffer(bytes(range(256)) * 8, dtype=np.uint8).copy())
    images = torch.full((5, 64), PIXEL_OFFSET, dtype=torch.long)
    cpu = next(pretrain.byte_batches(text, images, 8, 64, seed=1, image_every=4))
    gpu = next(pretrain.byte_batches(text.cuda(), images.cuda(), 8, 64, seed=1, image_every=4))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu, strict=True))
    assert pretrain.scan_path("cuda") in ("torch recurrence (trials.scan)", "mamba-ssm fused kernel")
