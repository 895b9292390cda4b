"""Resuming a stopped search: ``python -m search.run space.yaml --resume [SEARCH]``.

What the driver needs around ``PeftSearcher.resume`` (which rebuilds the phases from Optuna and MLflow):
- ``find``: which search to continue (the latest by default) and whether it can be: it must exist, must not have
  finished, must have been started with the same space, and its driver must not still be running;
- ``mark_interrupted`` and ``records``: the trial runs a killed driver left RUNNING become ``interrupted``
  (MLflow KILLED), then every trial run is read back with its number, phase, state and queue slot;
- ``LocalRay``: the processes of the local Ray cluster a driver started, written next to its results as soon as
  Ray is up; a resumed search ends those still alive (Ray's agents ignore SIGTERM, so SIGKILL follows a grace
  period). Only processes the driver itself started are recorded, so a cluster joined with ``--address`` is
  never touched.
- ``trial_counts``: a search's trials counted once each, by the state of their last run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from search import results
from search.searcher import FINAL_STATES, TrialRecord
from search.tracking import SPACE_ARTIFACT, effective_space
from space.metrics import TRIAL_STATES

# Keys that may differ on resume: where Ray runs is not part of what the search is.
MAY_DIFFER = ("search.address",)


class ResumeError(RuntimeError):
    """A search that cannot be resumed; the message says which and why."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def space_differences(before: str, now: str) -> list[str]:
    """``key: before -> now`` for every setting of two effective spaces that differs (``MAY_DIFFER`` aside)."""
    old, new = _flat(json.loads(before)), _flat(json.loads(now))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in MAY_DIFFER]


def find(c: Any, experiment: str, search_id: str | None, space: Any, processes: Path) -> dict[str, Any]:
    """The search to resume: ``search_id``, or the latest search of ``experiment``. A ResumeError says why not."""
    try:
        info = results.search_info(c, experiment, search_id)
    except results.ResultsError as exc:
        raise ResumeError(f"--resume: {exc}") from None
    name = info["name"]
    if info["status"] == results.STATUS_FINISHED:
        raise ResumeError(f"--resume: search {name} ({info['run_id']}) has finished; there is nothing to resume")
    driver = LocalRay(processes).driver_alive()
    if driver is not None:
        raise ResumeError(f"--resume: search {name} is still running (driver pid {driver}); stop it first")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            before = Path(c.download_artifacts(info["run_id"], SPACE_ARTIFACT, tmp)).read_text()
        except Exception:  # noqa: BLE001 - a search from before this artifact existed: nothing to compare
            before = None
    differ = space_differences(before, effective_space(space)) if before is not None else []
    if differ:
        raise ResumeError(f"--resume: search {name} ran with another space; resume it with the same space.yaml "
                          f"and options ({'; '.join(differ[:5])})")
    return info


def mark_interrupted(c: Any, search_run_id: str, experiment: str) -> int:
    """End the trial runs a killed driver left running: state ``interrupted``, MLflow KILLED. How many."""
    df = results.trials(c, experiment, search_run_id)
    if df.empty:
        return 0
    stale = df[df.status == results.STATUS_RUNNING]
    for run_id in stale.run_id:
        c.set_tag(run_id, "mps.status", results.STATUS_INTERRUPTED)
        c.set_terminated(run_id, "KILLED")
    return len(stale)


def records(c: Any, search_run_id: str, experiment: str) -> list[TrialRecord]:
    """Every trial run of a search, as ``PeftSearcher.resume`` reads them."""
    runs = c.search_runs([results.experiment_id(c, experiment)],
                         filter_string=f"tags.`mlflow.parentRunId` = '{search_run_id}'", max_results=50000)
    out = []
    for r in runs:
        tags = r.data.tags
        slot = tags.get("mps.slot")
        out.append(TrialRecord(int(r.info.run_name.rsplit("-", 1)[-1]), tags.get("mps.phase", "search"),
                               tags.get("mps.status", results.STATUS_RUNNING), int(slot) if slot else None))
    return sorted(out, key=lambda r: r.number)


def trial_counts(df: pd.DataFrame) -> tuple[dict[str, int], int]:
    """Trials counted once each by state (a trial run again after an interruption counts by its last run), and
    how many runs were interrupted and run again."""
    counts = dict.fromkeys(TRIAL_STATES[1:], 0)
    if df.empty:
        return counts, 0
    rerun = 0
    for _, runs in df.groupby("trial", sort=False):
        ended = runs[runs.status.isin(FINAL_STATES)]
        state = str(ended.status.iloc[-1]) if not ended.empty else str(runs.status.iloc[-1])
        counts[state] = counts.get(state, 0) + 1
        rerun += int((runs.status == results.STATUS_INTERRUPTED).sum()) if not ended.empty else 0
    return counts, rerun


class LocalRay:
    """The processes of the local Ray cluster this driver started, in a JSON file (``<results>/ray/<search>.pids``).

    Each process is named by pid and start time, so a pid the system reused is never taken for it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self) -> None:
        """Write the driver and every process it started (Ray's GCS, raylet and their agents and workers)."""
        import psutil

        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        entries = []
        for p in procs:
            try:
                entries.append({"pid": p.pid, "started": p.create_time(), "name": p.name()})
            except psutil.Error:
                continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"driver": entries[0], "processes": entries[1:]}, indent=1))
        os.replace(tmp, self.path)

    def _alive(self, entry: dict[str, Any]) -> Any:
        import psutil

        try:
            p = psutil.Process(int(entry["pid"]))
            return p if abs(p.create_time() - float(entry["started"])) < 0.01 and p.is_running() else None
        except (psutil.Error, KeyError, ValueError):
            return None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def driver_alive(self) -> int | None:
        entry = self._read().get("driver")
        return int(entry["pid"]) if entry and self._alive(entry) is not None else None

    def end_leftovers(self, grace: float = 2.0) -> list[str]:
        """End the recorded processes still alive: SIGTERM, then SIGKILL after ``grace`` seconds. Their names."""
        import psutil

        alive = [p for p in (self._alive(e) for e in self._read().get("processes", [])) if p is not None]
        names = []
        for p in alive:
            try:
                names.append(f"{p.name()} (pid {p.pid})")
            except psutil.Error:
                continue
        terminate(alive, grace)
        self.forget()
        return names

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)



def terminate(procs: list[Any], grace: float) -> None:
    """SIGTERM to each of ``procs`` (psutil processes), then SIGKILL to those alive ``grace`` seconds later."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            continue
    _, still = psutil.wait_procs(procs, timeout=grace)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(still, timeout=grace)


def ray_trial_ids(ray_dir: Path, run_name: str) -> list[str]:
    """Ray's own record of a search's trials: the trial ids in the latest experiment state of each of its sessions
    (``<search>``, ``<search>-resume-N``). A session that ended holds all its trials; the snapshot of a killed one
    (written every ``TUNE_GLOBAL_CHECKPOINT_S``) may lack those it started in its last seconds."""
    ids = []
    for session in sorted(ray_dir.glob(f"{run_name}*")):
        states = sorted(session.glob("experiment_state-*.json"))
        if session.is_dir() and states and session.name.removeprefix(run_name).startswith(("", "-resume-")):
            data = json.loads(states[-1].read_text())
            ids += [json.loads(trial[0])["trial_id"] for trial in data.get("trial_data", [])]
    return ids
