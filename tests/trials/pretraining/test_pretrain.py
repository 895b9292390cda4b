"""The stdlib+packages corpus (built here, carried), its held-out filter, the vectorised loader and a timed run."""

from __future__ import annotations

import json
import platform
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import small_trial_yaml
from trials.models.vocab import BYTE_OFFSET, PAD_ID, PIXEL_OFFSET
from trials.pretraining import pretrain
from trials.tasks.sources.pydoc import PYDOC_TOPICS
from trials.tasks.sources.stdlib import load_stdlib_modules_task, stdlib_functions

BUILT = Path(__file__).resolve().parents[3] / ".gpu" / "corpus" / "stdlib+packages.xz"


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
    complete = {f.summary for f in stdlib_functions()}  # a row cut at the task's length ends mid-summary
    for text in _heldout_split_texts()[::10]:
        summary = text.split("): ", 1)[1]
        if summary in complete:
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


def test_a_held_out_summary_shorter_than_a_shingle_drops_the_file_that_holds_it(tmp_path, held_out):
    short = "Does nothing."  # poplib.POP3.noop's summary, 13 bytes; numpy's _add_newdocs.py has it
    assert short in {f.summary for f in stdlib_functions()}
    site = _fake_site(tmp_path)
    (site / "pkg" / "noop.py").write_text(f'def noop():\n    """{short}\n\n    More words after it.\n    """\n')
    m = pretrain.build_corpus("stdlib+packages", tmp_path / "corpus.xz", packages=["pkg"], site=site,
                              held_out=held_out, stdlib=[])
    assert m["dropped_files"]["held_out"] == ["pkg/leak.py", "pkg/noop.py"]
    assert m["unchecked_pieces"] == 0 and m["held_out_pieces"] == held_out.pieces > 900


def test_every_held_out_piece_is_checked_and_a_near_miss_is_not_found(held_out):
    shortest = min(held_out_piece_lengths := [len(" ".join(p.split()).encode()) for p in pretrain.held_out_pieces()])
    assert held_out.unchecked == [] and shortest >= pretrain.MIN_PIECE and len(held_out_piece_lengths) > 900
    assert held_out.found(b"x = 1  # Does\n     nothing. Really.")
    assert not held_out.found(b"x = 1  # Does nothing much.") and not held_out.found(b"# Does anything.")


def test_files_too_large_or_not_utf8_are_dropped_and_named(tmp_path, held_out, monkeypatch):
    site = _fake_site(tmp_path)
    (site / "pkg" / "latin1.py").write_bytes('"""Caf\u00e9 au lait, written in Latin-1."""\n'.encode("latin-1"))
    (site / "pkg" / "table.py").write_text("TABLE = [" + "1, " * 400 + "]\n")
    monkeypatch.setattr(pretrain, "MAX_FILE_BYTES", 1000)
    m = pretrain.build_corpus("stdlib+packages", tmp_path / "corpus.xz", packages=["pkg"], site=site,
                              held_out=held_out, stdlib=[])
    assert m["dropped_files"]["not_utf8"] == ["pkg/latin1.py"]
    assert set(m["dropped_files"]["too_large"]) == {"pkg/table.py", "pkg/notes.rst"}  # notes.rst: 2,040 bytes
    assert m["dropped"]["too_large"] == 2 and all(f["bytes"] <= 1000 for f in m["files"])


def test_a_corpus_read_on_another_python_loads_with_a_warning_naming_both_versions(tmp_path, held_out):
    out = tmp_path / "corpus.xz"
    pretrain.build_corpus("stdlib+packages", out, packages=["pkg"], site=_fake_site(tmp_path), held_out=held_out,
                          stdlib=[])
    manifest = json.loads(pretrain.manifest_path(out).read_text())
    pretrain.manifest_path(out).write_text(json.dumps({**manifest, "python": "3.0.1"}))
    with pytest.warns(UserWarning, match=rf"built on Python 3\.0\.1, read on Python {platform.python_version()}"):
        loaded = pretrain.load_corpus_file(out)
    assert loaded.manifest["python"] == "3.0.1"


def test_the_validation_loss_of_a_slice_without_one_window_is_an_error():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(pretrain.build_config(hidden=16, layers=1, state=4))
    with pytest.raises(ValueError, match="has 31 bytes .* not one 32-byte window"):
        pretrain.validation_loss(model, torch.zeros(31, dtype=torch.uint8), length=32, batch=4, max_windows=8)
    with pytest.raises(ValueError, match="max_windows is 0"):
        pretrain.validation_loss(model, torch.zeros(64, dtype=torch.uint8), length=32, batch=4, max_windows=0)


def test_a_corpus_whose_validation_slice_is_shorter_than_a_window_is_refused_before_training(tmp_path, held_out,
                                                                                            monkeypatch):
    corpus = tmp_path / "corpus.xz"
    pretrain.build_corpus("stdlib+packages", corpus, packages=["pkg"], site=_fake_site(tmp_path), held_out=held_out,
                          stdlib=[])
    monkeypatch.setattr(pretrain, "_train_step", lambda *a: pytest.fail("trained before checking the slice"))
    with pytest.raises(ValueError, match="validation slice has 2040 bytes, not one 4096-byte window"):
        pretrain.pretrain(tmp_path / "ckpt", steps=2, batch=2, length=4096, lr=3e-3, hidden=16, layers=1, state=4,
                          seed=0, corpus="stdlib+packages", image_every=4, scan="auto", corpus_file=corpus)


def test_the_old_recipes_record_the_float64_mean_of_the_last_step_losses(tmp_path, monkeypatch):
    step, seen = pretrain._train_step, []

    def recording(*args):
        seen.append(step(*args).item())
        return torch.tensor(seen[-1])

    monkeypatch.setattr(pretrain, "_train_step", recording)
    info = pretrain.pretrain(tmp_path / "ckpt", steps=4, batch=2, length=16, lr=3e-3, hidden=16, layers=1, state=4,
                             seed=0, log_every=3, corpus="tiny", scan="auto")
    assert info["final_loss"] == float(np.mean(seen[-3:]))  # a float32 torch mean rounds away its last digits
    assert json.loads((tmp_path / "ckpt" / "pretrain.json").read_text())["final_loss"] == info["final_loss"]


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
    assert "--seed" not in card and f"on Python {info['python']}, trained on Python {info['python']}" in card
    assert "--seed 3 " in pretrain.model_card({**info, "seed": 3}).replace("`", " ")
    other = pretrain.model_card({**info, "corpus_python": "3.0.1"})
    assert "built on Python 3.0.1" in other and "held-out filter is Python 3.0.1's" in other
    assert f"this run's Python {info['python']}" in other
    result = run_trial(TrialConfig.from_yaml(small_trial_yaml(steps=2, eval_every=2, checkpoint=str(out))),
                       report=lambda r: None)
    assert 0.0 <= result.val_accuracy <= 1.0


def test_a_timed_run_picks_a_step_count_that_with_steps_gives_the_same_weights(tmp_path, held_out):
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.xz"
    pretrain.build_corpus("stdlib+packages", corpus, packages=["pkg"], site=_fake_site(tmp_path), held_out=held_out,
                          stdlib=pretrain.stdlib_files("tiny"))
    args = dict(batch=4, length=32, lr=3e-3, hidden=16, layers=1, state=4, seed=0, corpus="stdlib+packages",
                image_every=4, scan="auto", recipe="small-packages", corpus_file=corpus, val_windows=4)
    # The timing probe trains a copy on its own batches, so the run itself is the one `--steps N` makes. Loading
    # (the first in a process imports scikit-learn) takes seconds of the budget: the count is whatever is left.
    timed = pretrain.pretrain(tmp_path / "timed", steps=10_000, max_seconds=6.0, timed_steps=3, **args)
    fixed = pretrain.pretrain(tmp_path / "fixed", steps=timed["steps"], **args)
    assert 1 <= timed["steps"] < 10_000 and "max_seconds" in timed and "max_seconds" not in fixed
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("timed", "fixed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert timed["final_loss"] == fixed["final_loss"] and timed["val_loss"] == fixed["val_loss"]


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
    summaries = {f.summary for f in stdlib_functions()}  # every stdlib task's answers; "Does nothing." was in it
    assert not [s for s in summaries if " ".join(s.split()).encode() in text]
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
    assert pretrain.scan_path("cuda") in ("torch recurrence (trials.models.scan)", "mamba-ssm fused kernel")


def test_the_card_names_the_scan_the_model_ran_transformers_own_path_included():
    assert pretrain.scan_path("cpu", "mambapy") == "transformers' mambapy path"
    assert pretrain.scan_path("cuda", "hf_loop") == "transformers' hf_loop path"
    assert pretrain.scan_path("cuda", "torch") == "torch recurrence (trials.models.scan)"
    assert pretrain.scan_path("cpu", "torch") == "torch (trials.models.scan)"
