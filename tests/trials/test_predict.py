"""A model saved by trials.train runs on new inputs: trials.predict, and plain transformers as the README shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from space.config import TrialConfig
from tests.conftest import REPO, small_trial_yaml
from trials.predict import PredictError, load_predictor, main
from trials.tasks.sources.digits import digits_split_indices
from trials.trained import train


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory):
    """A mergeable digits trial trained for 4 steps: its output directory and reported metrics."""
    out = tmp_path_factory.mktemp("digits")
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods="lora_in_proj: {rank: 2}\n  d_delta: {}"))
    return out, train(cfg, out, steps=4, echo=quiet)


def digits_lines(split: str = "test") -> tuple[list[str], list[str]]:
    """A digits split as predict's input lines (64 intensities each) and its labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = digits_split_indices(0, 2)[split]
    return ([" ".join(str(int(v)) for v in d.images[i].reshape(-1)) for i in rows],
            [str(int(d.target[i])) for i in rows])


@pytest.mark.parametrize("form", ["merged", "adapter"])
def test_the_saved_model_reproduces_the_reported_test_accuracy(digits_out, tmp_path, form):
    out, metrics = digits_out
    if form == "adapter":  # the same output without its merged model: the base model plus the adapter
        shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("merged"))
        out = tmp_path / "out"
    lines, labels = digits_lines()
    results = load_predictor(out).predict(lines)
    accuracy = sum(r["label"] == y for r, y in zip(results, labels, strict=True)) / len(labels)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_predict_prints_a_label_and_its_probability_per_input(digits_out, tmp_path, capsys):
    out, _ = digits_out
    texts = tmp_path / "digits.txt"
    texts.write_text("\n".join(digits_lines()[0][:3]) + "\n\n")  # a blank line is no input
    assert main([str(out), str(texts)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(label in "0123456789" and 0.1 <= float(p) <= 1 for label, p in rows)
    assert main([str(out), str(texts), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["input"] == f"{texts}:1" and sum(first["probabilities"].values()) == pytest.approx(1.0)
    assert first["probabilities"][first["label"]] == first["probability"] == max(first["probabilities"].values())


def test_the_merged_directory_alone_runs_in_plain_transformers_as_the_readme_shows(digits_out, tmp_path):
    out, _ = digits_out
    merged = tmp_path / "copied"
    shutil.copytree(out / "merged", merged)  # the directory holds the whole model
    line = digits_lines()[0][0]
    expected = load_predictor(merged).predict([line])[0]

    from safetensors.torch import load_file
    from transformers import MambaForCausalLM

    lm = MambaForCausalLM.from_pretrained(merged).eval()
    head = load_file(merged / "head.safetensors")
    task = json.loads((merged / "task.json").read_text())
    ids = torch.tensor([[259 + int(v) for v in line.split()]])  # pixel tokens (text: 3 + each UTF-8 byte)
    with torch.no_grad():
        h = lm.backbone(ids).last_hidden_state  # [1, L, D]
        pooled = h[:, -1] if task["pooling"] == "last" else h.mean(1)
        probs = (pooled @ head["head.weight"].T + head["head.bias"]).softmax(-1)[0]
    assert task["labels"][int(probs.argmax())] == expected["label"] == lm.config.id2label[int(probs.argmax())]
    assert float(probs.max()) == pytest.approx(expected["probability"], abs=1e-4)


@pytest.fixture(scope="module")
def text_out(tmp_path_factory):
    """A text classification trial on user CSV data with string labels and max_length 16."""
    d = tmp_path_factory.mktemp("text")
    rows = [("good fun", "pos"), ("nice day", "pos"), ("bad luck", "neg"), ("sad news", "neg")] * 5
    (d / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    cfg = TrialConfig.from_yaml(small_trial_yaml().replace(
        "task: {name: digits, shots_per_class: 2}",
        f"task: {{name: csv, files: {{train: {d / 'train.csv'}}}, max_length: 16}}"))
    train(cfg, d / "out", steps=2, echo=quiet)
    return d / "out"


def test_a_text_model_predicts_its_class_names(text_out):
    results = load_predictor(text_out).predict(["good times", "bad times"])
    assert {r["label"] for r in results} <= {"neg", "pos"} and set(results[0]["probabilities"]) == {"neg", "pos"}


@pytest.mark.parametrize("case, message", [
    ("missing out", "no-such-dir: no such directory"),
    ("not a model", "holds no model saved by trials.train"),
    ("empty file", "texts.txt: no inputs (the file is empty"),
    ("too long", "texts.txt:2: 21 tokens, longer than the task's max_length 16"),
])
def test_bad_input_is_an_error_naming_the_file_and_line(text_out, tmp_path, capsys, case, message):
    texts = tmp_path / "texts.txt"
    texts.write_text({"empty file": "\n  \n", "too long": "short\n" + "x" * 21 + "\n"}.get(case, "fine\n"))
    out = {"missing out": tmp_path / "no-such-dir", "not a model": tmp_path}.get(case, text_out)
    assert main([str(out), str(texts)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_digits_line_that_is_not_an_image_names_its_line(digits_out):
    with pytest.raises(PredictError, match=r"in\.txt:7: expected 64 pixel intensities 0\.\.16"):
        load_predictor(digits_out[0]).predict(["1 2 3"], ["in.txt:7"])


def _lm_trial(d, task: str, file: str, text: str) -> TrialConfig:
    (d / file).write_text(text * 6)
    return TrialConfig.from_yaml(small_trial_yaml(methods="lora_in_proj: {rank: 2}").replace(
        "task: {name: digits, shots_per_class: 2}",
        f"task: {{name: {file.split('.')[1]}, type: {task}, files: {{train: {d / file}}}, max_length: 32}}"))


def test_a_causal_lm_model_prints_its_greedy_continuation(tmp_path, capsys):
    cfg = _lm_trial(tmp_path, "causal_lm", "train.csv", "prompt,response\n" + "say a:,a\nsay b:,b\n" * 4)
    train(cfg, tmp_path / "out", steps=2, echo=quiet)
    (tmp_path / "prompts.txt").write_text("say a:\nsay b:\n")
    assert main([str(tmp_path / "out"), str(tmp_path / "prompts.txt"), "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(isinstance(json.loads(line), str) for line in lines)
    assert all(len(json.loads(line).encode()) <= 3 for line in lines)  # bytes: one token each


def test_a_multiple_choice_model_picks_a_choice_with_probabilities(tmp_path):
    cfg = _lm_trial(tmp_path, "multiple_choice", "train.jsonl",
                    '{"question": "1+1=", "choices": ["2", "3"], "answer": 0}\n'
                    '{"question": "2+1=", "choices": ["4", "3"], "answer": 1}\n')
    train(cfg, tmp_path / "out", steps=2, echo=quiet)
    predictor = load_predictor(tmp_path / "out")
    [result] = predictor.predict(['{"question": "3+1=", "choices": ["4", "5", "6"]}'])
    assert result["choice"] in ("4", "5", "6") and sum(result["probabilities"]) == pytest.approx(1.0)
    assert result["probability"] == max(result["probabilities"])
    with pytest.raises(PredictError, match="q.txt:2: expected"):
        predictor.predict(['{"question": "3+1=", "choices": ["4"]}'], ["q.txt:2"])


def test_trials_train_and_predict_import_no_mlflow():
    code = "import sys, trials.train, trials.predict; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
