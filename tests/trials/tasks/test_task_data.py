"""Data of the causal_lm and multiple_choice task types: the built-in stdlib tasks, user CSV/JSONL and datasets
data, tokenizer support (eos, chat template), and the errors bad data gets."""

from __future__ import annotations

import importlib
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from space.config import ModelSpec, TaskSpec
from trials.heldout import STDLIB_TASK_MODULES
from trials.models.vocab import SEP_ID, ByteTokenizer
from trials.pretraining import pretrain
from trials.tasks.base import DataError, Split, TaskData
from trials.tasks.registry import TASK_TYPES, load_task
from trials.tasks.sources.files import load_files_task
from trials.tasks.sources.hf import load_hf_dataset_task
from trials.tasks.sources.stdlib import (
    STDLIB_SPLIT_CAPS,
    load_stdlib_docstrings_task,
    load_stdlib_functions_task,
    stdlib_functions,
)
from trials.tasks.tokenizers import HFTokenizer

BYTES = ByteTokenizer()
LM_COLUMNS = {"prompt": "prompt", "response": "response", "instruction": "instruction", "input": "input",
              "output": "output"}
MC_COLUMNS = {"question": "question", "choices": "choices", "answer": "answer"}


def row_text(split: Split, i: int) -> tuple[str, str]:
    """Row i decoded as (the part before ``starts``, the part from it), with the byte tokenizer."""
    assert split.starts is not None
    ids = split.ids[i, : int(split.lengths[i])].tolist()
    start = int(split.starts[i])
    return BYTES.decode(ids[:start]), BYTES.decode(ids[start:])


def questions(split: Split) -> list[tuple[str, list[str], int]]:
    """A multiple_choice split back as (question, choices, answer) for rows that were not truncated."""
    assert split.groups is not None
    out: dict[int, tuple[str, list[str], int]] = {}
    for i in range(len(split)):
        question, choice = row_text(split, i)
        q, choices, answer = out.setdefault(int(split.groups[i]), (question, [], -1))
        if split.labels[i]:
            answer = len(choices)
        choices.append(choice)
        out[int(split.groups[i])] = (q, choices, answer)
    return [out[g] for g in sorted(out)]


def expected_sizes(n: int) -> dict[str, int]:
    test, val = min(n // 5, STDLIB_SPLIT_CAPS["test"]), min(n // 5, STDLIB_SPLIT_CAPS["validation"])
    return {"train": min(n - test - val, STDLIB_SPLIT_CAPS["train"]), "val": val, "test": test}


def sizes(task: TaskData) -> dict[str, int]:
    return {k: getattr(task, k).num_examples for k in ("train", "val", "test")}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def lm_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: what is {i} + {i}?\n", "response": str(2 * i)} for i in range(n)]


def mc_rows(n: int) -> list[dict]:
    return [{"question": f"Which is {i}?", "choices": [str(i), str(i + 1), "neither"], "answer": 0} for i in range(n)]


# --- built-in tasks ---------------------------------------------------------------------------------------------


def test_stdlib_docstrings_splits_are_disjoint_and_sized_as_documented():
    task = load_stdlib_docstrings_task(max_length=4096)
    prompts = {f"{f.name}{f.signature}\n" for f in stdlib_functions()}
    assert (task.type, task.num_classes, task.notes) == ("causal_lm", 0, ())
    assert sizes(task) == expected_sizes(len(prompts))
    seen = [{row_text(s, i)[0] for i in range(len(s))} for s in (task.train, task.val, task.test)]
    assert sum(map(len, seen)) == sum(len(s) for s in (task.train, task.val, task.test))  # no prompt twice
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_stdlib_docstrings_rows_are_signature_prompt_then_summary_then_eos():
    task = load_stdlib_docstrings_task(max_length=4096)
    summary = {f"{f.name}{f.signature}\n": f.summary for f in stdlib_functions()}
    for split in (task.train, task.val, task.test):
        assert split.groups is None and not split.labels.any()
        for i in range(len(split)):
            prompt, response = row_text(split, i)
            assert response == summary[prompt]
            assert int(split.ids[i, int(split.lengths[i]) - 1]) == SEP_ID


def test_stdlib_functions_rows_are_question_then_one_of_four_names():
    task = load_stdlib_functions_task(max_length=4096)
    funcs = {f.name: f for f in stdlib_functions()}
    unique = [f for f in funcs.values() if sum(g.summary == f.summary for g in funcs.values()) == 1]
    assert (task.type, task.num_classes, task.notes) == ("multiple_choice", 0, ())
    assert sizes(task) == expected_sizes(len(unique))
    for split in (task.train, task.val, task.test):
        assert split.groups is not None and split.groups.tolist() == sorted(split.groups.tolist())
        assert torch.bincount(split.groups).tolist() == [4] * split.num_examples
        for question, choices, answer in questions(split):
            names = [c.removeprefix(" ") for c in choices]
            right = funcs[names[answer]]
            assert question == f"Which function: {right.summary}\nAnswer:"
            assert len(set(names)) == 4 and all(n in funcs for n in names)
            if sum(f.module == right.module for f in funcs.values()) >= 4:
                assert all(funcs[n].module == right.module for n in names)


def test_stdlib_functions_splits_share_no_question():
    task = load_stdlib_functions_task(max_length=4096)
    seen = [{q for q, _, _ in questions(s)} for s in (task.train, task.val, task.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


@pytest.mark.parametrize("load", [load_stdlib_docstrings_task, load_stdlib_functions_task])
def test_stdlib_tasks_are_fixed_by_split_seed(load):
    a, b, other = load(0), load(0), load(1)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).ids, getattr(b, split).ids)
    assert not torch.equal(a.test.ids[:50], other.test.ids[:50])


def test_stdlib_tasks_use_no_pretraining_module_and_no_pretraining_text():
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for name in STDLIB_TASK_MODULES:
        source = Path(importlib.import_module(name).__file__ or "").resolve()
        assert source.suffix == ".py" and str(source.relative_to(root)) not in pretrain.STDLIB_FILES, name
        assert "pydoc" not in name
    corpus = BYTES.decode(pretrain.text_corpus())
    assert not [f.summary for f in stdlib_functions() if f.summary in corpus]


def test_stdlib_tasks_load_through_the_task_spec_with_its_max_length():
    task = load_task(TaskSpec(name="stdlib_docstrings", max_length=48), ModelSpec(tokenizer="bytes"))
    assert task.type == "causal_lm" and task.train.ids.shape[1] <= 48
    assert task.notes and all("longer than max_length 48 were truncated" in n for n in task.notes)
    assert load_task(TaskSpec(name="stdlib_functions"), ModelSpec(tokenizer="bytes")).type == "multiple_choice"


# --- user data ---------------------------------------------------------------------------------------------------


def test_causal_lm_csv_cuts_missing_splits_by_seed_and_ends_responses_with_eos(tmp_path):
    lines = [f'"{r["prompt"]}",{r["response"]}' for r in lm_rows(40)]
    (tmp_path / "train.csv").write_text("prompt,response\n" + "\n".join(lines) + "\n")
    files = {"train": str(tmp_path / "train.csv")}
    task = load_files_task("csv", TASK_TYPES["causal_lm"], files, LM_COLUMNS, BYTES, 64, seed=0)
    assert (task.type, sizes(task)) == ("causal_lm", {"train": 32, "val": 4, "test": 4})
    source = {r["prompt"]: r["response"] for r in lm_rows(40)}
    rows = [row_text(s, i) for s in (task.train, task.val, task.test) for i in range(len(s))]
    assert sorted(rows) == sorted(source.items())  # CSV numbers stay text: "10", not 10
    assert int(task.train.ids[0, int(task.train.lengths[0]) - 1]) == SEP_ID
    assert task.decode is not None and task.decode(task.test.ids[0].tolist()) == "".join(row_text(task.test, 0))
    again = load_files_task("csv", TASK_TYPES["causal_lm"], files, LM_COLUMNS, BYTES, 64, seed=0)
    reseeded = load_files_task("csv", TASK_TYPES["causal_lm"], files, LM_COLUMNS, BYTES, 64, seed=1)
    assert torch.equal(task.test.ids, again.test.ids) and not torch.equal(task.test.ids, reseeded.test.ids)


def test_causal_lm_reads_alpaca_instruction_input_output(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say bye.", "output": "bye"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    task = load_files_task("jsonl", TASK_TYPES["causal_lm"],
                           {"train": path, "validation": path, "test": path}, LM_COLUMNS,
                              BYTES, 64)
    assert [row_text(task.train, i) for i in range(3)] == [
        ("Add the numbers.\n\n2 3", "5"), ("Say hi.", "hi"), ("Say bye.", "bye")]


def test_causal_lm_columns_are_renamed_by_the_task_spec(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"q": f"ask {i}", "a": f"answer {i}"} for i in range(20)])
    spec = TaskSpec(name="jsonl", type="causal_lm", files={"train": path}, columns={"prompt": "q", "response": "a"})
    task = load_task(spec, ModelSpec(tokenizer="bytes"))
    assert task.type == "causal_lm" and row_text(task.train, 0)[1].startswith("answer ")


def test_multiple_choice_jsonl_reads_answers_as_index_digit_letter_or_text(tmp_path):
    answers = [2, "2", "C", "neither"]
    rows = [{"question": "Which?", "choices": ["0", "1", "neither"], "answer": a} for a in answers]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    task = load_files_task("jsonl", TASK_TYPES["multiple_choice"], {"train": path, "validation": path, "test": path},
                              MC_COLUMNS, BYTES, 64)
    assert task.type == "multiple_choice" and task.train.num_examples == 4 and len(task.train) == 12
    assert questions(task.train) == [("Which?", [" 0", " 1", " neither"], 2)] * 4


def test_multiple_choice_csv_reads_one_column_per_choice(tmp_path):
    body = "q,a,b,c,d,ans\nCapital of France?,Rome,Paris,Oslo,Bern,B\nTwo plus two?,3,4,5,22,1\n"
    (tmp_path / "train.csv").write_text(body)
    spec = TaskSpec(name="csv", type="multiple_choice", files={k: str(tmp_path / "train.csv") for k in
                                                               ("train", "validation", "test")},
                    columns={"question": "q", "choices": ["a", "b", "c", "d"], "answer": "ans"})
    task = load_task(spec, ModelSpec(tokenizer="bytes"))
    assert questions(task.val) == [("Capital of France?", [" Rome", " Paris", " Oslo", " Bern"], 1),
                                   ("Two plus two?", [" 3", " 4", " 5", " 22"], 1)]


def test_multiple_choice_truncation_keeps_the_choice_and_is_noted(tmp_path):
    rows = [{"question": "x" * 40, "choices": ["yes", "no"], "answer": "A"}] * 10
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    task = load_files_task("jsonl", TASK_TYPES["multiple_choice"], {"train": path, "validation": path, "test": path},
                              MC_COLUMNS, BYTES, 16)
    assert questions(task.test)[0] == ("x" * 12, [" yes", " no"], 0)
    assert f"task.files.train ({path}): 20 of 20 rows longer than max_length 16 were truncated" in task.notes


def test_causal_lm_truncation_is_noted_per_split(tmp_path):
    rows = lm_rows(10) + [{"prompt": "p" * 30, "response": "r" * 30}] * 2
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    short = write_jsonl(tmp_path / "short.jsonl", lm_rows(3))
    task = load_files_task("jsonl", TASK_TYPES["causal_lm"], {"train": train, "validation": short, "test": short},
                              LM_COLUMNS, BYTES, 24)
    assert task.notes == (f"task.files.train ({train}): 2 of 12 rows longer than max_length 24 were truncated",)


def test_hugging_face_dataset_for_multiple_choice_cuts_a_missing_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", mc_rows(30))
    write_jsonl(tmp_path / "test.jsonl", mc_rows(5))
    task = load_hf_dataset_task(str(tmp_path), None, {"train": "train", "test": "test"}, TASK_TYPES["multiple_choice"],
                                MC_COLUMNS,
                           BYTES, 16)
    assert sizes(task) == {"train": 24, "val": 3, "test": 5}
    cut = f"task.hf_splits.validation (cut from {str(tmp_path)!r} split 'train' by split_seed 0): "
    assert any(note.startswith(cut) for note in task.notes)


def test_classification_reads_the_columns_named_by_role(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"review": f"film {i}", "stars": i % 2} for i in range(20)])
    spec = TaskSpec(name="jsonl", files={"train": path}, columns={"text": "review", "label": "stars"})
    task = load_task(spec, ModelSpec(tokenizer="bytes"))
    assert (task.type, task.num_classes, sizes(task)) == ("classification", 2, {"train": 16, "val": 2, "test": 2})


# --- bad data -----------------------------------------------------------------------------------------------------


def bad_lm(tmp_path: Path, rows: list[dict]) -> str:
    good = write_jsonl(tmp_path / "good.jsonl", lm_rows(3))
    bad = write_jsonl(tmp_path / "bad.jsonl", lm_rows(3) + rows)
    load_files_task("jsonl", TASK_TYPES["causal_lm"],
                    {"train": good, "validation": bad, "test": good}, LM_COLUMNS, BYTES, 64)
    return bad


@pytest.mark.parametrize(("row", "column", "problem"), [
    ({"prompt": "p"}, "response", "expected non-empty text, got None"),  # JSONL: a key only other rows have
    ({"prompt": 5, "response": "r"}, "prompt", "expected non-empty text, got 5"),
    ({"prompt": "p", "response": None}, "response", "expected non-empty text, got None"),
    ({"prompt": "p", "response": "  "}, "response", "expected non-empty text"),
])
def test_bad_causal_lm_rows_name_file_row_and_column(tmp_path, row, column, problem):
    with pytest.raises(DataError) as err:
        bad_lm(tmp_path, [row])
    assert f"task.files.validation ({tmp_path / 'bad.jsonl'}): row 3: column {column!r}: {problem}" in str(err.value)


def test_a_column_missing_from_a_file_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", lm_rows(3))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "reply": "r"}])
    with pytest.raises(DataError) as err:
        load_files_task("jsonl", TASK_TYPES["causal_lm"],
                        {"train": good, "validation": good, "test": bad}, LM_COLUMNS, BYTES,
                           64)
    assert f"task.files.test ({bad}): row 0: column 'response': missing (columns: ['prompt', 'reply'])" in str(
        err.value)


def test_causal_lm_without_either_column_set_names_the_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "output": "o"}])
    with pytest.raises(DataError) as err:
        load_files_task("jsonl", TASK_TYPES["causal_lm"], {"train": path}, LM_COLUMNS, BYTES, 64)
    message = str(err.value)
    assert str(path) in message and "row 0" in message
    assert "missing ['response']" in message and "missing ['instruction']" in message


@pytest.mark.parametrize(("answer", "choices", "column", "problem"), [
    ("E", ["a", "b", "c", "d"], "answer", "answer 'E' is outside the 4 choices"),
    (7, ["a", "b"], "answer", "answer 7 is outside the 2 choices"),
    ("maybe", ["a", "b"], "answer", "'maybe' is not a choice index, a letter or one of the choices"),
    (1.5, ["a", "b"], "answer", "expected a choice index, letter or choice text, got 1.5"),
    (0, "a|b", "choices", "expected a list of at least 2 choices, got 'a|b'"),
    (0, ["a", ""], "choices", "choice 1: expected non-empty text, got ''"),
    (None, ["a", "b"], "answer", "got None"),
])
def test_bad_multiple_choice_rows_name_file_row_and_column(tmp_path, answer, choices, column, problem):
    bad = {"question": "Which?", "choices": choices}
    if answer is not None:
        bad["answer"] = answer
    good = write_jsonl(tmp_path / "good.jsonl", mc_rows(4))
    path = write_jsonl(tmp_path / "bad.jsonl", mc_rows(2) + [bad])
    with pytest.raises(DataError) as err:
        load_files_task("jsonl", TASK_TYPES["multiple_choice"],
                        {"train": good, "validation": good, "test": path}, MC_COLUMNS,
                           BYTES, 64)
    assert f"task.files.test ({path}): row 2: column {column!r}: " in str(err.value)
    assert problem in str(err.value)


def test_an_answer_that_is_a_position_and_another_choices_text_is_ambiguous(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "choices": ["1", "0"], "answer": "1"}])
    with pytest.raises(DataError, match=r"row 0: column 'answer': '1' is both the position of choice 1 and the "
                                        r"text of choice 0"):
        load_files_task("jsonl", TASK_TYPES["multiple_choice"], {"train": path, "validation": path, "test": path},
                           MC_COLUMNS, BYTES, 64)


def test_a_missing_csv_choice_column_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("question,a,b,answer\nQ,x,y,A\nR,x,,B\n")
    files = {k: str(tmp_path / "train.csv") for k in ("train", "validation", "test")}
    with pytest.raises(DataError, match=r"train.csv\): row 1: column 'b': expected non-empty text, got None"):
        load_files_task("csv", TASK_TYPES["multiple_choice"], files, {**MC_COLUMNS, "choices": ["a", "b"]}, BYTES, 64)
    with pytest.raises(DataError, match=r"train.csv\): row 0: column 'c': missing"):
        load_files_task("csv", TASK_TYPES["multiple_choice"],
                        files, {**MC_COLUMNS, "choices": ["a", "b", "c"]}, BYTES, 64)


def test_an_empty_split_names_its_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", lm_rows(5))
    (tmp_path / "val.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match=rf"task.files.validation \({tmp_path / 'val.csv'}\): no rows"):
        load_files_task("csv", TASK_TYPES["causal_lm"], {"train": train, "validation": str(tmp_path / "val.csv"),
                                                "test": train}, LM_COLUMNS, BYTES, 64)


def test_a_bad_dataset_row_names_the_dataset_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", mc_rows(3) + [{"question": "Q", "choices": ["a", "b"], "answer": "Z"}])
    with pytest.raises(DataError) as err:
        load_hf_dataset_task(str(tmp_path), None, {"train": "train"}, TASK_TYPES["multiple_choice"],
                             MC_COLUMNS, BYTES, 64)
    assert f"task.hf_dataset {str(tmp_path)!r} split 'train': row 3: column 'answer'" in str(err.value)


# --- tokenizers -----------------------------------------------------------------------------------------------


def test_byte_tokenizer_ends_responses_with_the_embedded_models_eos():
    config = json.loads((Path(pretrain.__file__).parent.parent / "assets/tiny-mamba/config.json").read_text())
    assert BYTES.eos_id == SEP_ID == config["eos_token_id"]
    assert BYTES.format_prompt("x\n") == "x\n"


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A character-level tokenizer with an eos and a chat template, built and saved offline."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<user>": 3, "<bot>": 4}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<user>", "<bot>"])
    fast.chat_template = ("{% for m in messages %}<user>{{ m.content }}{% endfor %}"
                          "{% if add_generation_prompt %}<bot>{% endif %}")
    path = tmp_path_factory.mktemp("chat-tokenizer")
    fast.save_pretrained(path)
    return path


def test_hf_tokenizer_applies_its_chat_template_and_appends_its_eos(chat_tokenizer_dir, tmp_path):
    tok = HFTokenizer(str(chat_tokenizer_dir))
    assert tok.eos_id == 1 and tok.format_prompt("hi") == "<user>hi<bot>"
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "hi", "response": "yo"}])
    task = load_files_task("jsonl", TASK_TYPES["causal_lm"],
                           {"train": path, "validation": path, "test": path}, LM_COLUMNS,
                              tok, 64)
    ids = task.train.ids[0, : int(task.train.lengths[0])].tolist()
    assert ids[0] == 3 and ids[int(task.train.starts[0]) - 1] == 4 and ids[-1] == 1  # <user> ... <bot> yo </s>
    assert task.decode is not None and task.decode(ids) == "hiyo"


def test_hf_tokenizer_without_a_chat_template_keeps_the_prompt(chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    assert HFTokenizer(str(tmp_path)).format_prompt("hi\n") == "hi\n"
