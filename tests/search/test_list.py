"""``python -m search.list`` names every search of a store with its state and its trials counted by state."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from search.list import main


def _store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("mamba-peft-search", artifact_location=(tmp_path / "a").as_uri())
    for name, status, trial_states, start in (("old", "finished", ["finished", "pruned", "pruned"], 1_000),
                                               ("new", "interrupted", ["finished", "interrupted"], 2_000)):
        run = c.create_run(exp, run_name=name, start_time=start, tags={"mps.kind": "search", "mps.status": status})
        for i, state in enumerate(trial_states):
            c.create_run(exp, run_name=f"trial-{i + 1:03d}", tags={"mlflow.parentRunId": run.info.run_id,
                                                                    "mps.kind": "trial", "mps.status": state})
        c.set_terminated(run.info.run_id, "FINISHED" if status == "finished" else "KILLED", end_time=start + 60_000)
    return uri


def test_lists_searches_newest_first_with_trial_counts_by_state(tmp_path, capsys):
    assert main(["--tracking-uri", _store(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["search", "name", "state", "trials"]
    assert {"finished", "pruned", "interrupted"} <= set(header) and "failed" not in header  # only states present
    new, old = (dict(zip(header, line.split()[:len(header)], strict=False)) for line in lines[1:3])
    assert (new["name"], new["state"], new["trials"], new["interrupted"]) == ("new", "interrupted", "2", "1")
    assert (old["name"], old["state"], old["trials"], old["pruned"]) == ("old", "finished", "3", "2")


def test_a_missing_store_is_an_error_naming_it(tmp_path, capsys):
    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_a_resumed_search_that_runs_again_shows_no_end_time(tmp_path, capsys):
    from search.tracking import SearchRun
    from space.config import SearchSpace

    uri = _store(tmp_path)
    c = MlflowClient(uri)
    (stopped,) = [r for r in c.search_runs([c.get_experiment_by_name("mamba-peft-search").experiment_id])
                  if r.info.run_name == "new"]
    SearchRun(uri, "mamba-peft-search", tmp_path / "a", "new", SearchSpace.model_validate({}), "",
              resume_id=stopped.info.run_id)  # what --resume does to the stopped search's run
    assert main(["--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    new = dict(zip(header, lines[1].split(), strict=False))
    assert new["name"] == "new" and new["state"] == "running" and lines[1].rstrip().endswith("-")
