"""Resume: a search stopped by ``kill -9``, Ctrl-C or SIGTERM continues with ``--resume``, losing and repeating no
trial, in one MLflow search run, with Optuna, MLflow and Ray agreeing, and no Ray process of the stopped driver left.

The end-to-end tests run real small searches in subprocesses on the embedded default; the searcher's restore logic
for every phase (stage 1, stage 2, re-evaluation) is also driven by hand, as Ray would drive it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search import results
from search.resume import LocalRay, ResumeError, find, ray_trial_ids
from search.run import sigterm_as_sigint
from search.searcher import FINAL_STATES, NUMBER_ATTR, STATE_ATTR, PeftSearcher, TrialRecord
from search.tracking import SearchRun
from tests.conftest import REPO
from tests.search.test_end_to_end import SPACE
from tests.search.test_searcher import Recorder, Sizes, finish, make_space

EXPERIMENT = "mamba-peft-search"
LEARNING_RATE = "learning_rate: {low: 0.001, high: 0.01, log: true}}"  # stage 2 trains distinct configurations


def _space(tmp_path: Path, extra: str = "") -> Path:
    """test_end_to_end's space, 6 trials 2 at a time, with a searched learning rate."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(trials=6, concurrency=2, results=tmp_path / "runs", extra=extra)
                     .replace("batch_size: 8}", f"batch_size: 8, {LEARNING_RATE}"))
    return space


# -- end to end: real searches in subprocesses ------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen:
    # A session of its own, as a terminal's foreground job: Ctrl-C reaches the driver and everything it started.
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _run_to_end(proc: subprocess.Popen, started: list[psutil.Process], first_start: list[float]) -> str:
    """Read a driver's output to its end, noting every process it starts and when its first trial starts."""
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        started += [p for p in _descendants(proc.pid) if p not in started]
        if " start " in line and not first_start:
            first_start.append(time.monotonic())
    proc.wait(timeout=60)
    return "".join(out)


def _run_until(proc: subprocess.Popen, stop: str, after: str | None = None) -> tuple[str, list[psutil.Process]]:
    """Read a driver's output until a line with ``stop`` (once a line with ``after`` was seen); its processes then."""
    out, seen = [], after is None
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        seen = seen or (after is not None and after in line)
        if seen and stop in line:
            return "".join(out), _descendants(proc.pid)
    raise AssertionError(f"the search ended before {stop!r}:\n{''.join(out)[-3000:]}")


def _store(runs: Path) -> tuple:
    c = results.client(f"sqlite:///{runs / 'mlflow.db'}")
    searches = results.searches(c, EXPERIMENT)
    assert len(searches) == 1  # the search is one MLflow run from start to finish
    info = searches.iloc[0]
    runs_ = c.search_runs([results.experiment_id(c, EXPERIMENT)],
                          filter_string=f"tags.`mlflow.parentRunId` = '{info.run_id}'", max_results=1000)
    return c, info, runs_


def _optuna_trials(runs: Path) -> list:
    storage = f"sqlite:///{runs / 'optuna.db'}"
    return [t for s in optuna.get_all_study_summaries(storage)
            for t in optuna.load_study(study_name=s.study_name, storage=storage).trials]


def _check_complete(runs: Path, num_trials: int, interrupted: set[int]) -> list:
    """The resumed search finished with every trial once, the interrupted ones run again, Optuna, MLflow and Ray
    agreeing, and nothing RUNNING."""
    c, info, trial_runs = _store(runs)
    assert info.status == results.STATUS_FINISHED and c.get_run(info.run_id).info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in trial_runs)
    by_number: dict[str, list] = {}
    for r in trial_runs:
        by_number.setdefault(r.info.run_name, []).append(r)
    # Every trial has exactly one run in a final state; the in-flight ones also have their interrupted run.
    for name, tries in by_number.items():
        states = Counter(r.data.tags["mps.status"] for r in tries)
        assert sum(states[s] for s in FINAL_STATES) == 1, (name, states)
        assert states["interrupted"] == (int(name.removeprefix("trial-")) in interrupted), (name, states)
    for number in interrupted:  # run again with the same configuration
        tries = by_number[f"trial-{number:03d}"]
        assert len({(r.data.tags["mps.summary"], json.dumps(r.data.params, sort_keys=True)) for r in tries}) == 1
    searched = [n for n, tries in by_number.items() if tries[0].data.tags["mps.phase"] not in ("reevaluate",)]
    assert len(searched) == num_trials
    # No configuration trained to an end twice (a repeat would be a duplicate, never a second training).
    trained = Counter((r.data.tags["mps.phase"], r.data.tags["mps.summary"], json.dumps(r.data.params, sort_keys=True))
                      for r in trial_runs if r.data.tags["mps.status"] in ("finished", "pruned"))
    assert max(trained.values()) == 1, trained
    # Optuna holds the searched trials' runs, one trial per run, in the same states.
    optuna_runs = Counter((f"trial-{t.user_attrs[NUMBER_ATTR]:03d}", t.user_attrs[STATE_ATTR])
                          for t in _optuna_trials(runs) if NUMBER_ATTR in t.user_attrs)
    mlflow_runs = Counter((r.info.run_name, r.data.tags["mps.status"]) for r in trial_runs
                          if r.data.tags["mps.phase"] != "reevaluate")
    assert optuna_runs == mlflow_runs
    assert not [t for t in _optuna_trials(runs) if t.state == TrialState.RUNNING]
    # Ray's experiment states, over the search's sessions, hold each trial once and only trials MLflow holds. A
    # killed session's last snapshot may lack the trials it started in its last seconds: those were interrupted.
    ray_ids = ray_trial_ids(runs / "ray", info["name"])
    mlflow_ids = {r.data.tags["mps.ray_trial_id"]: r.data.tags["mps.status"] for r in trial_runs
                  if "mps.ray_trial_id" in r.data.tags}
    assert len(ray_ids) == len(set(ray_ids)) and set(ray_ids) <= set(mlflow_ids)
    assert {mlflow_ids[i] for i in set(mlflow_ids) - set(ray_ids)} <= {"interrupted"}
    resumed = set(ray_trial_ids(runs / "ray", f"{info['name']}-resume-1"))  # a session that ended: all it ran
    first = set(ray_ids) - resumed
    assert resumed == {i for i, state in mlflow_ids.items() if i not in first and state != "interrupted"}
    assert not list((runs / "ray").glob("*.pids"))  # the record of the local Ray is gone with it
    return trial_runs


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_search_resumes_without_losing_or_repeating_a_trial_and_leaves_no_ray_process(tmp_path):
    space = _space(tmp_path)
    driver = _start([str(space)])
    # Killed while a trial trains, after at least one trial ended.
    _, procs = _run_until(driver, " step ", after=" finished ")
    # Trials run at the driver's priority, not Ray's default niceness 15 (search.run.worker_niceness).
    workers = [p for p in procs if "ImplicitFunc" in " ".join(p.cmdline())]
    assert workers and {p.nice() for p in workers} == {psutil.Process(driver.pid).nice()}
    driver.kill()
    driver.wait(timeout=30)
    c, info, trial_runs = _store(tmp_path / "runs")
    assert c.get_run(info.run_id).info.status == "RUNNING"  # what kill -9 leaves
    in_flight = {int(r.info.run_name.removeprefix("trial-")) for r in trial_runs if r.info.status == "RUNNING"}
    in_flight |= {t.user_attrs[NUMBER_ATTR] for t in _optuna_trials(tmp_path / "runs")
                  if t.state == TrialState.RUNNING and NUMBER_ATTR in t.user_attrs}  # started in Optuna only
    assert in_flight
    time.sleep(1)
    assert _alive(procs)  # Ray's agents outlive a killed driver (they ignore SIGTERM too)

    resumed = _start([str(space), "--resume"])
    started: list[psutil.Process] = []
    out = _run_to_end(resumed, started, [])
    assert resumed.returncode == 0, out[-3000:]
    assert "ended 2 process(es) the stopped search's Ray left behind" in out or "ended " in out
    assert "interrupted trial(s) run again first" in out
    _check_complete(tmp_path / "runs", 6, in_flight)
    time.sleep(1)
    assert not _alive(procs), "processes of the killed driver's Ray are still running"
    assert not _alive(started), "processes of the resumed driver's Ray are still running"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ctrl_c_in_stage_2_marks_what_ran_prints_the_resume_command_and_that_command_finishes_the_search(tmp_path):
    space = _space(tmp_path, "  strategy: two_stage\n  stage1_trials: 3")
    driver = _start([str(space), "--num-trials", "6"])
    before, procs = _run_until(driver, " start ", after="stage 2: tuning")
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 1
    c, info, trial_runs = _store(tmp_path / "runs")
    assert info.status == results.STATUS_INTERRUPTED and c.get_run(info.run_id).info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in trial_runs)  # nothing left RUNNING
    interrupted = {int(r.info.run_name.removeprefix("trial-")) for r in trial_runs
                   if r.data.tags["mps.status"] == "interrupted"}
    assert interrupted and all(r.info.status == "KILLED" for r in trial_runs if r.data.tags["mps.status"] ==
                               "interrupted")
    assert {r.data.tags["mps.phase"] for r in trial_runs} >= {"stage1", "stage2"}
    assert not [t for t in _optuna_trials(tmp_path / "runs") if t.state == TrialState.RUNNING]
    command = next(line for line in out.splitlines() if "resume with: " in line).split("resume with: ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == [sys.executable, "-m", "search.run"] and words[-2:] == ["--resume", info.run_id]
    assert "--num-trials" in words  # the options it ran with
    time.sleep(1)
    assert not _alive(procs)

    resumed = subprocess.Popen(words, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    started: list[psutil.Process] = []
    after = _run_to_end(resumed, started, [])
    assert resumed.returncode == 0, after[-3000:]
    trial_runs = _check_complete(tmp_path / "runs", 6, interrupted)
    phases = Counter(r.data.tags["mps.phase"] for r in trial_runs if r.data.tags["mps.status"] in FINAL_STATES)
    assert phases["stage1"] == 3 and phases["stage2"] == 3 and phases["reevaluate"] == 1  # each counted once
    time.sleep(1)
    assert not _alive(started)


# -- the searcher's restore logic, driven by hand --------------------------------------------------------------------
def _searcher(space, storage, recorder=None) -> PeftSearcher:
    return PeftSearcher(space, storage, "s", Sizes(), None, 100_000, recorder or Recorder(), echo=lambda line: None)


def _records(s: PeftSearcher, configs: dict[str, dict], states: dict[str, str]) -> list[TrialRecord]:
    """What MLflow would hold for the Ray trials ``configs`` (by Ray id) and the trials the searcher settled."""
    out = [TrialRecord(c["number"], c["phase"], states.get(tid, "running"), c["slot"]) for tid, c in configs.items()]
    settled = [(n, phase, state) for n, phase, state, _ in s.recorder.calls]  # type: ignore[attr-defined]
    return out + [TrialRecord(n, phase, state) for n, phase, state in settled]


def _drive(s: PeftSearcher, configs: dict[str, dict], prefix: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        config = s.suggest(f"{prefix}{i}")
        if isinstance(config, dict):
            configs[f"{prefix}{i}"] = config
            ids.append(f"{prefix}{i}")
    return ids


def test_a_searcher_killed_in_stage_1_runs_its_in_flight_trials_again_under_their_numbers_then_goes_on():
    storage = optuna.storages.InMemoryStorage()
    space = make_space({"search": {"strategy": "two_stage", "num_trials": 6, "stage1_trials": 3, "concurrency": 3}})
    first = _searcher(space, storage)
    configs: dict[str, dict] = {}
    ids = _drive(first, configs, "a", 3)
    assert len(ids) == 3
    finish(first, ids[0], 0.6)
    # The driver dies: trials 2 and 3 are RUNNING in Optuna and in MLflow (resume marks those interrupted first).
    states = {ids[0]: "finished", ids[1]: "interrupted", ids[2]: "interrupted"}
    second = _searcher(space, storage)
    reruns = second.resume(_records(first, configs, states))
    assert sorted(r.number for r in reruns) == [configs[t]["number"] for t in ids[1:]]
    study = second.phases[0].study
    assert [t.user_attrs[STATE_ATTR] for t in study.trials if t.state == TrialState.FAIL] == ["interrupted"] * 2
    again = {tid: second.suggest(tid) for tid in ("b0", "b1")}
    for tid, config in again.items():  # the same numbers, configurations and phase, as new Optuna trials
        before = next(c for c in configs.values() if c["number"] == config["number"])
        assert (config["trial"], config["phase"], config["params"]) == (before["trial"], "stage1", before["params"])
        finish(second, tid, 0.5)
    assert len(study.trials) == 5 and sorted(t.user_attrs[NUMBER_ATTR] for t in study.trials) == [1, 2, 2, 3, 3]
    second.suggest("c0")  # stage 1 is spent: stage 2 follows (trained or settled as duplicates), numbered after it
    stage2 = second.phases[1].study
    assert stage2 is not None and min(t.user_attrs[NUMBER_ATTR] for t in stage2.trials) == 4


def test_a_searcher_killed_in_stage_2_keeps_stage_1_and_the_methods_it_chose():
    storage = optuna.storages.InMemoryStorage()
    space = make_space({"search": {"strategy": "two_stage", "num_trials": 6, "stage1_trials": 3, "concurrency": 1},
                        "training": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}})
    first = _searcher(space, storage)
    configs: dict[str, dict] = {}
    for i in range(3):
        (tid,) = _drive(first, configs, f"a{i}-", 1) or [None]
        if tid is not None:
            finish(first, tid, 0.3 + 0.2 * (configs[tid]["trainable_params"] % 7) / 7)
    ids = _drive(first, configs, "b", 1)
    assert ids and configs[ids[0]]["phase"] == "stage2"
    chosen = first.stage1_selection
    second = _searcher(space, storage)
    reruns = second.resume(_records(first, configs, {t: "finished" for t in configs if t != ids[0]}))
    assert [(r.phase.name, r.number) for r in reruns] == [("stage2", configs[ids[0]]["number"])]
    assert second.current == 1 and second.stage1_selection == chosen
    assert second.phases[0].proposed == 3 and second.phases[1].proposed == 1


def test_a_searcher_killed_during_reevaluation_runs_only_the_unfinished_seeds_again():
    storage = optuna.storages.InMemoryStorage()
    space = make_space({"search": {"num_trials": 3, "concurrency": 3, "reevaluate": {"top": 2, "seeds": 1}}})
    first = _searcher(space, storage)
    configs: dict[str, dict] = {}
    for i, tid in enumerate(_drive(first, configs, "a", 3)):
        finish(first, tid, 0.4 + 0.1 * i)
    seeds = _drive(first, configs, "r", 2)
    assert [configs[t]["phase"] for t in seeds] == ["reevaluate"] * len(seeds) and seeds
    finish(first, seeds[0], 0.5)
    states = {t: "finished" for t in configs if t != seeds[-1]}
    second = _searcher(space, storage)
    reruns = second.resume(_records(first, configs, states))
    assert len(second.phases[0].study.trials) == len(first.phases[0].study.trials)  # no searched trial again
    if len(seeds) == 2:
        assert [(r.phase.name, r.slot, r.number) for r in reruns] == [("reevaluate", 1, configs[seeds[1]]["number"])]
        again = second.suggest("x")
        assert isinstance(again, dict) and again["trial"] == configs[seeds[1]]["trial"] and again["slot"] == 1
        finish(second, "x", 0.5)
    assert second.suggest("y") == Searcher.FINISHED and second.exhausted()


def test_a_trial_started_in_optuna_but_never_in_mlflow_gets_an_interrupted_run_and_is_run_again():
    storage = optuna.storages.InMemoryStorage()
    space = make_space({"search": {"concurrency": 2}})
    first = _searcher(space, storage)
    configs: dict[str, dict] = {}
    ids = _drive(first, configs, "a", 2)
    finish(first, ids[0], 0.5)
    recorder = Recorder()
    second = _searcher(space, storage, recorder)
    records = [r for r in _records(first, configs, {ids[0]: "finished"}) if r.number != configs[ids[1]]["number"]]
    reruns = second.resume(records)
    assert [r.number for r in reruns] == [configs[ids[1]]["number"]]
    assert second.number == configs[ids[1]]["number"]  # the next new trial is numbered after it
    assert [(n, state) for n, _, state, _ in recorder.calls] == [(configs[ids[1]]["number"], "interrupted")]


def test_a_resumed_study_does_not_propose_its_first_configurations_again():
    storage = optuna.storages.InMemoryStorage()
    space = make_space({"search": {"num_trials": 12, "concurrency": 1},
                        "training": {"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}}})
    first = _searcher(space, storage)
    configs: dict[str, dict] = {}
    for i in range(3):
        for tid in _drive(first, configs, f"a{i}-", 1):
            finish(first, tid, 0.5)
    recorder = Recorder()
    second = _searcher(space, storage, recorder)
    second.resume(_records(first, configs, dict.fromkeys(configs, "finished")))
    config = second.suggest("b")
    assert isinstance(config, dict) and config["trial"] not in {c["trial"] for c in configs.values()}
    assert recorder.calls == []  # not even proposed again and settled as a duplicate


# -- the driver's side: what it finds, what it ends --------------------------------------------------------------------
def test_processes_of_a_recorded_local_ray_are_ended_even_when_they_ignore_sigterm(tmp_path):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == "1"  # SIGTERM is ignored now
        record = LocalRay(tmp_path / "s.pids")
        record.record()
        data = json.loads(record.path.read_text())
        assert data["driver"]["pid"] == os.getpid() and record.driver_alive() == os.getpid()
        # A process of the same pid but another start time is not one of them (a pid the system reused).
        for entry in data["processes"]:
            if entry["pid"] == other.pid:
                entry["started"] -= 100
        data["processes"] = [e for e in data["processes"] if e["pid"] in (stubborn.pid, other.pid)]
        record.path.write_text(json.dumps(data))
        t0 = time.monotonic()
        ended = record.end_leftovers(grace=0.5)
        assert time.monotonic() - t0 < 10
        assert [f"(pid {stubborn.pid})" in e for e in ended] == [True]
        assert stubborn.poll() is not None  # it ignores SIGTERM: SIGKILL ended it
        assert other.poll() is None and not record.path.exists()
    finally:
        for p in (stubborn, other):
            p.kill()
            p.wait()


def _search_run(tmp_path: Path, space_extra: dict | None = None, status: str | None = None) -> tuple:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = make_space(space_extra)
    run = SearchRun(uri, EXPERIMENT, tmp_path / "art", "s-1", space, "x: 1\n")
    if status is not None:
        run.finish(status, None, {})
    return results.client(uri), run, space


def test_resume_refuses_a_finished_search_and_a_different_space_naming_the_setting(tmp_path):
    c, run, space = _search_run(tmp_path, status=results.STATUS_INTERRUPTED)
    assert find(c, EXPERIMENT, None, space, tmp_path / "ray")["run_id"] == run.run_id
    with pytest.raises(ResumeError, match=r"search.num_trials: 6 -> 9"):
        find(c, EXPERIMENT, run.run_id, make_space({"search": {"num_trials": 9}}), tmp_path / "ray")
    with pytest.raises(ResumeError, match="no search run 'nope'"):
        find(c, EXPERIMENT, "nope", space, tmp_path / "ray")
    SearchRun(results.client(f"sqlite:///{tmp_path / 'mlflow.db'}").tracking_uri, EXPERIMENT, tmp_path / "art",
              "s-2", space, "x: 1\n").finish(results.STATUS_FINISHED, None, {})
    with pytest.raises(ResumeError, match="has finished; there is nothing to resume"):
        find(c, EXPERIMENT, None, space, tmp_path / "ray")


def test_a_reopened_search_run_is_the_same_run_and_counts_the_time_it_already_ran(tmp_path):
    c, run, space = _search_run(tmp_path)
    run.hypervolume(1, 0.5)
    run.finish(results.STATUS_INTERRUPTED, None, {})
    spent = float(c.get_run(run.run_id).data.tags["mps.seconds"])
    again = SearchRun(c.tracking_uri, EXPERIMENT, tmp_path / "art", "s-1", space, "", resume_id=run.run_id)
    assert again.run_id == run.run_id and c.get_run(run.run_id).info.status == "RUNNING"
    assert again.seconds() >= spent
    again.finish(results.STATUS_FINISHED, None, {})
    assert len(results.searches(c, EXPERIMENT)) == 1 and c.get_run(run.run_id).info.status == "FINISHED"


def test_sigterm_stops_a_search_as_ctrl_c_does():
    # Python's own Ctrl-C handler, as in a driver before Ray Tune installs its own (an in-process search earlier in
    # the suite may have left Tune's, which stops a running experiment instead of raising).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or the handler an earlier in-process ray.init left
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_as_sigint():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) == before  # put back as it was
