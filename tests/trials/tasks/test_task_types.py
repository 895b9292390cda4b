"""Task types on the model: the language-model read-out, the losses and metrics of causal_lm and multiple_choice,
and every PEFT method training through them."""

from __future__ import annotations

import math

import pytest
import torch

from space.config import SearchSpace, SpaceError, TaskSpec, TrialConfig
from space.methods import PromptConfig
from tests.trials.methods.test_methods import COMBOS, PLAIN, ids, methods_of, perturb
from trials.methods import apply_methods
from trials.models.vocab import ByteTokenizer
from trials.run import run_trial
from trials.tasks.base import TaskData
from trials.tasks.batching import batches
from trials.tasks.registry import evaluate_split, task_model, train_loss
from trials.tasks.types.causal_lm import LanguageModel, greedy_generate, make_lm_split
from trials.tasks.types.multiple_choice import choice_matrix, make_choice_split

LM_TASKS = {"causal_lm": TaskSpec(name="csv", files={"train": "x"}, type="causal_lm"),
            "multiple_choice": TaskSpec(name="csv", files={"train": "x"}, type="multiple_choice")}


def _lm_split(seed: int = 0, n: int = 4):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(torch.randint(3, 40, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist(),
              torch.randint(3, 40, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist())
             for _ in range(n)]
    return make_lm_split(pairs, 32, "test")[0]


def _choice_split(seed: int = 0, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    questions = []
    for q in range(n):
        k = 2 + q % 3  # 2, 3 and 4 choices
        choices = [torch.randint(3, 40, (1 + c % 3,), generator=gen).tolist() for c in range(k)]
        questions.append((torch.randint(3, 40, (4,), generator=gen).tolist(), choices, q % k))
    return make_choice_split(questions, 32, "test")[0]


def _batch(split):
    return next(batches(split, 64, torch.Generator().manual_seed(0)))


def test_continuation_logprobs_equal_the_full_logits_read_at_the_continuation(tiny_lm):
    model = LanguageModel(tiny_lm)
    split = _lm_split()
    summed, count = model.continuation_logprobs(split.ids, split.lengths, split.starts)
    logp = tiny_lm(split.ids, use_cache=False).logits.log_softmax(-1)  # [B, L, V]
    for i in range(len(split)):
        start, length = int(split.starts[i]), int(split.lengths[i])
        want = sum(float(logp[i, t - 1, split.ids[i, t]].detach()) for t in range(start, length))
        assert math.isclose(float(summed[i]), want, rel_tol=1e-4, abs_tol=1e-4), i
        assert int(count[i]) == length - start


def test_causal_lm_loss_is_the_mean_response_token_nll(tiny_lm):
    model = LanguageModel(tiny_lm)
    split = _lm_split()
    summed, count = model.continuation_logprobs(split.ids, split.lengths, split.starts)
    loss = train_loss(model, (split.ids, split.lengths, split.labels, split.starts), LM_TASKS["causal_lm"])
    assert float(loss) == pytest.approx(float(-summed.sum() / count.sum()), rel=1e-5)
    data = TaskData("t", 0, split, split, split, type="causal_lm")
    scores = evaluate_split(model, split, data, LM_TASKS["causal_lm"], eos_id=None)
    assert scores["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-6)


def test_the_prompt_changes_the_loss_but_is_not_scored(tiny_lm):
    model = LanguageModel(tiny_lm)
    split = _lm_split()
    base = train_loss(model, (split.ids, split.lengths, split.labels, split.starts), LM_TASKS["causal_lm"])
    ids = split.ids.clone()
    ids[:, 0] = 39  # a prompt token: the response's likelihood moves, the count of scored tokens does not
    moved = train_loss(model, (ids, split.lengths, split.labels, split.starts), LM_TASKS["causal_lm"])
    assert not math.isclose(float(base), float(moved), rel_tol=1e-6)
    _, count = model.continuation_logprobs(ids, split.lengths, split.starts)
    assert int(count.sum()) == int((split.lengths - split.starts).sum())


def test_choice_matrix_lays_out_each_question_and_its_answer():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.8])
    groups = torch.tensor([4, 4, 7, 7, 7, 9, 9])
    labels = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    matrix, answer = choice_matrix(scores, groups, labels)
    assert matrix.shape == (3, 3) and torch.isinf(matrix[0, 2]) and torch.isinf(matrix[2, 2])
    torch.testing.assert_close(matrix[1], torch.tensor([0.3, 0.2, 0.5]))
    assert answer.tolist() == [1, 2, 0]


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_multiple_choice_accuracy_picks_the_best_scored_choice(tiny_lm, scoring):
    model = LanguageModel(tiny_lm)
    split = _choice_split(n=6)
    task = TaskSpec(name="csv", files={"train": "x"}, type="multiple_choice", choice_scoring=scoring)
    summed, count = model.continuation_logprobs(split.ids, split.lengths, split.starts)
    score = summed / count if scoring == "mean" else summed
    right = 0
    for q in range(split.num_examples):
        rows = (split.groups == q).nonzero()[:, 0]
        right += int(split.labels[rows[int(score[rows].argmax())]] == 1)
    data = TaskData("t", 0, split, split, split, type="multiple_choice")
    assert evaluate_split(model, split, data, task, eos_id=None)["accuracy"] == pytest.approx(right / 6)


def test_multiple_choice_batches_hold_whole_questions():
    split = _choice_split(n=5)
    ids_, lengths, labels, starts, groups = next(batches(split, 2, torch.Generator().manual_seed(3)))
    assert len(set(groups.tolist())) == 2 and int(labels.sum()) == 2
    for q in set(groups.tolist()):
        assert int((groups == q).sum()) == int((split.groups == q).sum())


def test_greedy_generation_matches_one_prompt_at_a_time(tiny_lm):
    model = LanguageModel(tiny_lm)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([11, 12, 13, 14, 15])]
    together = greedy_generate(model, prompts, 4, eos_id=None)
    for p, got in zip(prompts, together, strict=True):
        ids_ = p.clone()
        for _ in range(4):
            nxt = int(tiny_lm(ids_[None], use_cache=False).logits[0, -1].argmax())
            ids_ = torch.cat([ids_, torch.tensor([nxt])])
        assert got == ids_[len(p):].tolist()
    first = together[0]
    k = next(k for k in range(len(first)) if first[k] not in first[:k] and k > 0) if len(set(first)) > 1 else 0
    stopped = greedy_generate(model, prompts[:1], 4, eos_id=first[k])
    assert stopped[0] == first[:k]  # stops at the end-of-sequence token, which is not kept


def test_greedy_generation_reads_the_device_once_a_token_whatever_the_batch(tiny_lm, monkeypatch):
    """Each host read waits for the device (CUDA): one per generated token, not one per row and token."""
    model = LanguageModel(tiny_lm)
    reads = []
    for name in ("tolist", "item", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (
            reads.append(_name), _real(self, *a, **k))[1])
    prompts = [torch.tensor([5 + i, 6, 7]) for i in range(8)]
    greedy_generate(model, prompts, 5, eos_id=None)
    assert len(reads) <= 5 + 3 + 2, reads  # a read per token, the outputs once, the setup


@pytest.mark.parametrize("task_type", list(LM_TASKS))
@pytest.mark.parametrize("combo", [c for c in COMBOS if len(c) == 1 or len(c) == len(PLAIN)], ids=ids)
def test_every_method_trains_through_the_language_model_task_types(tiny_lm, task_type, combo):
    methods = methods_of(combo, tiny_lm)
    prompt = methods.get("prompt_tuning")
    if isinstance(prompt, PromptConfig) and prompt.position != "prefix":
        pytest.skip("a suffix prompt is refused for language-model task types (tested below)")
    applied = apply_methods(tiny_lm, methods)
    perturb(applied)
    model = task_model(tiny_lm, task_type, 0, "last")
    model.train()
    split = _lm_split(n=6) if task_type == "causal_lm" else _choice_split(n=4)
    train_loss(model, _batch(split), LM_TASKS[task_type]).backward()
    for name, p in tiny_lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


def test_a_suffix_prompt_is_refused_for_language_model_task_types():
    with pytest.raises(ValueError, match=r"prompt_tuning.position: 'suffix' .* causal_lm task never reads"):
        TrialConfig.model_validate({"model": {}, "task": {"name": "stdlib_docstrings"},
                                    "methods": {"prompt_tuning": {"position": "suffix"}}})
    with pytest.raises(ValueError, match=r"\['prefix', 'prefix_suffix'\] .* multiple_choice task never reads"):
        SearchSpace.model_validate({"task": {"name": "stdlib_functions"}, "methods": {"prompt_tuning": {
            "enabled": True, "position": {"choices": ["prefix", "prefix_suffix"]}}}})


@pytest.mark.parametrize("task, objective, message", [
    ("stdlib_docstrings", "val_accuracy", "a causal_lm task does not measure 'val_accuracy'; it measures val_loss"),
    ("digits", "val_loss", "a classification task does not measure 'val_loss'"),
    ("stdlib_docstrings", "val_exact_match", "val_exact_match needs task.max_new_tokens > 0"),
])
def test_an_objective_that_does_not_fit_the_task_type_is_an_error(task, objective, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.model_validate({"task": {"name": task}, "objectives": [{"metric": objective}]})


def test_each_task_type_has_its_default_objectives():
    assert SearchSpace.model_validate({"task": {"name": "stdlib_docstrings"}}).objective_names == [
        "val_loss", "trainable_params"]
    assert SearchSpace.model_validate({"task": {"name": "stdlib_functions"}}).objective_names == [
        "val_accuracy", "trainable_params"]


@pytest.mark.parametrize("bad, message", [
    ({"name": "digits", "type": "causal_lm"}, "task 'digits' is a classification task, not causal_lm"),
    ({"name": "csv", "files": {"train": "x"}, "type": "causal_lm", "columns": {"question": "q"}},
     "columns.question: not a column role of a causal_lm task"),
    ({"name": "csv", "files": {"train": "x"}, "columns": {"text": ["a", "b"]}}, "columns.text: one column name"),
    ({"name": "digits", "choice_scoring": "sum"}, "choice_scoring: only a multiple_choice task"),
    ({"name": "stdlib_docstrings", "choice_scoring": "sum"}, "choice_scoring: only a multiple_choice task"),
    ({"name": "stdlib_functions", "max_new_tokens": 4}, "max_new_tokens: only a causal_lm task generates"),
])
def test_bad_task_settings_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec.model_validate(bad)


def test_pooling_is_refused_for_a_language_model_task_type():
    with pytest.raises(ValueError, match="model.pooling: only a classification task pools"):
        SearchSpace.model_validate({"task": {"name": "stdlib_docstrings"}, "model": {"pooling": "mean"}})


def _words_task() -> TaskData:
    tok = ByteTokenizer()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    pairs = [(tok.encode(f"say {w}:"), tok.encode(w) + [2]) for w in words * 4]
    split = make_lm_split(pairs, 32, "t")[0]
    return TaskData("words", 0, split, split, split, type="causal_lm", decode=tok.decode)


@pytest.mark.slow
def test_a_causal_lm_trial_reports_its_metrics_at_every_rung_and_learns():
    cfg = TrialConfig.model_validate({
        "model": {}, "task": {"name": "csv", "files": {"train": "x"}, "type": "causal_lm", "max_new_tokens": 6,
                              "exact_match_examples": 6},
        "methods": {"lora_in_proj": {"rank": 4}}, "training": {"rungs": [5, 30], "learning_rate": 0.01,
                                                               "batch_size": 8}})
    reports: list[dict] = []
    result = run_trial(cfg, reports.append, data=_words_task())
    assert [r["step"] for r in reports] == [5, 30]
    assert {"val_loss", "val_perplexity", "val_exact_match"} <= set(reports[0])
    assert reports[-1]["finished"] and {"test_loss", "test_exact_match"} <= set(reports[-1])
    assert result.scores["val_loss"] < reports[0]["val_loss"]
    assert result.trainable_params == 4 * 4 * (64 + 2 * 128)  # LoRA r4 on in_proj, 4 layers: no task head


def test_trial_config_of_a_user_task_loads_with_its_type():
    with pytest.raises(SpaceError):
        TrialConfig.from_yaml("model: {}\ntask: {name: csv, type: nonsense, files: {train: x}}\n", where="t.yaml")


@pytest.mark.slow
def test_a_trained_causal_lm_trial_saves_and_reloads_to_the_same_predictions(tmp_path):
    from trials.trained import load_trained, train

    cfg = TrialConfig.model_validate({
        "model": {}, "task": {"name": "stdlib_docstrings", "max_length": 48},
        "methods": {"lora_in_proj": {"rank": 2}, "a_log_delta": {}},
        "training": {"rungs": [4], "learning_rate": 0.01, "batch_size": 8}})
    metrics = train(cfg, tmp_path, echo=lambda line: None)
    assert {"val_loss", "test_loss", "val_perplexity"} <= set(metrics) and "val_accuracy" not in metrics
    assert metrics["merge_max_rel_error"] is not None and metrics["merge_max_rel_error"] < 1e-4
    from trials.tasks.registry import load_task

    data = load_task(cfg.task, cfg.model)
    for merged in (False, True):
        model = load_trained(tmp_path, merged=merged)
        assert isinstance(model, LanguageModel) and model.head is None
        scores = evaluate_split(model, data.val, data, cfg.task, eos_id=None)
        assert scores["loss"] == pytest.approx(metrics["val_loss"], rel=1e-4), merged  # what train reported
