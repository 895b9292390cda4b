"""Optuna inside Ray Tune: the searcher that proposes, rejects, deduplicates, prunes and re-evaluates.

``PeftSearcher`` is a Ray Tune ``Searcher`` that drives Optuna studies by ask and tell, one phase after another:
- ``search`` (one stage), or ``stage1`` then ``stage2`` (the two-stage recipe, space.stages);
- ``reevaluate``: the most accurate front configurations again, with further seeds, at the full budget.
Each phase proposes its trial budget. A proposal is built once into a validated ``TrialConfig`` and handed to the
worker as that object's JSON. Before anything trains:
- its closed-form trainable count comes from a ``Probe`` (a Ray actor, so the driver never imports torch);
- above ``search.max_trainable`` it is rejected: Optuna records it COMPLETE with a violated constraint and the
  worst quality (so that NSGA-II and GP, which read only complete trials, see it as well as TPE); samplers and
  ``study.best_trials`` treat it as infeasible;
- a configuration that already finished, or was pruned, is not trained again: its outcome is reused (state
  ``duplicate``); one proposed while its twin is still running waits for it, and is trained only if that twin
  fails.
While trials train, ``RungScheduler`` hands every rung report to ``PeftSearcher.rung``, which stores the value in
the Optuna trial's user attributes (``search.pruners.record_rung``) and asks the study's pruner; Ray stops what it
prunes. Ray is told to stop asking once every phase is done or the time budget would be overrun.

``PeftSearcher.resume`` continues a stopped search (``python -m search.run --resume``) from what Optuna and MLflow
hold; its docstring says why the search is rebuilt from them rather than restored from Ray's experiment state.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from search.faults import FAILED, error_reason, error_text
from search.hypervolume import search_hypervolume
from search.pruners import RUNG_ATTR, SIZE_ATTR, make_pruner, record_rung
from space.config import PRUNER_OPTIONS, SearchSpace, TrialConfig, baseline_trial, dimensions, sample_trial
from space.metrics import WORST, better, direction, quality_metric, size_metric, test_metric
from space.stages import selected_methods, stage1_space, stage2_sampler
from trials.report import FINISHED

STATE_ATTR = "mps_state"  # the trial state in the project's words (space.metrics.TRIAL_STATES)
ERROR_ATTR = "mps_error"  # a failed trial's exception type and message
KEY_ATTR = "mps_config"  # the configuration, as compared for duplicates
NUMBER_ATTR = "mps_number"  # the trial's number (trial-NNN); a trial run again after an interruption keeps it
TRIAL_ATTR = "mps_trial"  # the TrialConfig handed to Ray, as JSON: what a resumed search runs again
METRICS_ATTR = "mps_metrics"  # a finished trial's objectives and test metric: what its duplicates reuse
# States a trial ends in for good; ``interrupted`` (and ``running``, for a driver that was killed) are run again.
FINAL_STATES = ("finished", "pruned", "failed", "duplicate", "rejected")
CONSTRAINT = "max_trainable"


@dataclass(frozen=True)
class TrialRecord:
    """One MLflow run of a search's trial, as ``PeftSearcher.resume`` reads it (``search.resume.records``)."""

    number: int
    phase: str
    state: str  # mps.status; runs still ``running`` when the driver died are marked interrupted first
    slot: int | None = None  # baseline and re-evaluation runs: their place in the phase's queue


@dataclass
class Rerun:
    """A trial that was in flight when the search stopped: trained again with its number and configuration."""

    phase: Phase
    number: int | None  # None: the driver died before it got a run; it takes the next number
    cfg: TrialConfig
    size: int
    of: int | None = None
    slot: int | None = None
    frozen: optuna.trial.FrozenTrial | None = None  # its interrupted Optuna trial (searched phases)


class Sizes(Protocol):
    """What the searcher asks of a ``trials.probe.Probe`` (directly, or in a child: ``search.probe_process``)."""

    def trainable(self, cfg: TrialConfig) -> int: ...


class Recorder(Protocol):
    """Where the searcher records what never reaches Ray (rejected and duplicate proposals) and the hypervolume."""

    def settled(self, number: int, phase: str, cfg: TrialConfig, params: dict[str, Any], state: str,
                metrics: dict[str, float], note: str) -> None: ...

    def hypervolume(self, completed: int, value: float) -> None: ...


def config_key(cfg: TrialConfig) -> str:
    """Two proposals are the same configuration when everything but the seed is equal. A language-model task with no
    method trains nothing, so its training settings (the learning rate, ...) do not make it another one."""
    exclude: dict[str, Any] = {"seed": True}
    if not cfg.methods and cfg.task.task_type != "classification":
        exclude["training"] = True
    return json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True)


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    s = space.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        # Every searched value is a list of choices (SearchSpace checks it for the grid sampler).
        grid = {name: list(getattr(value, "choices", [])) for name, value in dimensions(space).items()}
        return OpenGridSampler(grid, seed=seed)
    if s.sampler == "nsga2":
        # A population near the trial budget, or NSGA-II would sample at random for its whole first generation.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, s.num_trials // 4)))
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)  # needs torch and scipy in the driver, unlike the others
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        # Multivariate TPE with the constant liar: suited to conditional spaces and parallel suggestions.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, s.num_trials // 3)))


class OpenGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` once the grid is used up, which raises outside
    ``optimize()``: the searcher's trial budget ends the phase instead, and a grid point proposed again is a
    duplicate, reused rather than trained."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        pass


def penalty(metric: str, size: int, base_params: int) -> float:
    """The value a rejected configuration is told for ``metric``: its real size for a size objective, else the
    metric's worst value, so that samplers which read only COMPLETE trials (NSGA-II, GP) see it too."""
    if metric == "trainable_params":
        return float(size)
    if metric == "trainable_pct":
        return 100.0 * size / max(base_params, 1)
    if metric in WORST:
        return WORST[metric]
    return -1e12 if direction(metric) == "max" else 1e12


# Phases whose trials are references, never candidates: not on the front, not in the hypervolume, not "best".
REFERENCE_PHASES = ("baseline", "reevaluate")


@dataclass
class Phase:
    name: str  # baseline | search | stage1 | stage2 | reevaluate
    budget: int
    study: optuna.Study | None = None
    sample: Callable[[Any], TrialConfig] | None = None
    # baseline and reevaluate: (config, the trial number it re-evaluates or None)
    queue: list[tuple[TrialConfig, int | None]] = field(default_factory=list)
    proposed: int = 0


@dataclass
class Live:
    number: int
    phase: str
    cfg: TrialConfig
    key: str
    size: int
    ot: optuna.trial.Trial | None
    started: float
    last_step: int = 0
    slot: int | None = None  # baseline and re-evaluation trials: their place in the phase's queue


class PeftSearcher(Searcher):
    def __init__(self, space: SearchSpace, storage: Any, study_name: str, sizes: Sizes, limit: int | None,
                 base_params: int, recorder: Recorder, echo: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.space = space
        self.storage = storage
        self.study_name = study_name
        self.sizes = sizes
        self.limit = limit
        self.base_params = base_params
        self.recorder = recorder
        self.echo = echo
        self.clock = clock
        self.start = clock()
        self.objectives = space.objective_names
        self.quality = quality_metric(self.objectives)
        self.size = size_metric(self.objectives)
        self.max_steps = space.training.budget.max_steps
        self.phases = self._plan()
        self.current = 0
        self.number = 0
        self.live: dict[str, Live] = {}
        self.pruned: dict[str, int] = {}  # Ray trial id -> the rung step it was pruned at
        self.states: dict[str, str] = {}  # Ray trial id -> final state
        # config key -> the first finished (or pruned) trial of that configuration: a later proposal reuses it
        self.outcomes: dict[str, dict[str, Any]] = {}
        # config key -> proposals of a configuration that was running when they came: settled when it ends
        self.pending: dict[str, list[tuple[optuna.trial.Trial, Phase, TrialConfig, int]]] = {}
        self.relaunch: list[tuple[optuna.trial.Trial, Phase, TrialConfig, int]] = []  # pending whose original failed
        self.results: list[dict[str, Any]] = []  # finished trials of the searched phases
        self.durations: list[float] = []  # seconds a trial takes at the full budget, estimated from each trial
        self.steps_saved = 0
        self.steps_trained = 0
        self.failures = 0  # searched trials that failed (search.max_failures ends the search past it)
        self.errors: dict[str, str] = {}  # Ray trial id -> failure reason, until the trial completes
        self.done = False  # every phase proposed its budget (or the time budget ended the search)
        self.completed = 0  # searched trials over, in any state (the hypervolume curve's x axis)
        self.stop_reason: str | None = None
        self.stage1_selection: list[str] | None = None
        self.reruns: list[Rerun] = []  # in flight when the search stopped: trained first on resume
        self.records: dict[str, list[TrialRecord]] | None = None  # MLflow's trials by phase, while resuming

    # -- phases -------------------------------------------------------------------------------------------------
    def _study(self, suffix: str, seed: int) -> optuna.Study:
        p = self.space.search.pruner
        pruner = make_pruner(p.name, self._direction(), **{k: getattr(p, k) for k in PRUNER_OPTIONS[p.name]})
        study = optuna.create_study(
            storage=self.storage, study_name=f"{self.study_name}{suffix}", load_if_exists=True,
            directions=["maximize" if o.mode == "max" else "minimize" for o in self.space.objectives],
            sampler=make_sampler(self.space, seed), pruner=pruner or optuna.pruners.NopPruner())
        told = len(study.get_trials(deepcopy=False))
        if told:  # a resumed study: a sampler seeded as at the start would propose its first trials again
            study.sampler = make_sampler(self.space, seed + told)
        return study

    def _direction(self) -> str:
        return next(o.mode for o in self.space.objectives if o.metric == self.quality)

    def _plan(self) -> list[Phase]:
        s = self.space.search
        if s.strategy == "two_stage":
            first = Phase("stage1", s.stage1, self._study("-stage1", s.seed))
            space1 = stage1_space(self.space)
            first.sample = lambda trial: sample_trial(space1, trial)
            phases = [first, Phase("stage2", s.num_trials - s.stage1)]
        else:
            first = Phase("search", s.num_trials, self._study("", s.seed))
            first.sample = lambda trial: sample_trial(self.space, trial)
            phases = [first]
        assert first.study is not None
        for params in s.enqueue:
            first.study.enqueue_trial(params, skip_if_exists=True)
        if s.baselines:  # after the searched phases, so searched trials are numbered 1..num_trials
            queue: list[tuple[TrialConfig, int | None]] = [(baseline_trial(self.space, b), None) for b in s.baselines]
            phases.append(Phase("baseline", len(queue), queue=queue))
        if s.reevaluate.top > 0:
            phases.append(Phase("reevaluate", 0))
        return phases

    def _advance(self) -> None:
        """The current phase has proposed its budget and nothing of it runs: set up the next one (and, on resume,
        restore what of it already ran)."""
        self.current += 1
        if self.current >= len(self.phases):
            return
        phase = self.phases[self.current]
        self._setup(phase)
        if self.records is not None:
            self._restore(phase)

    def _setup(self, phase: Phase) -> None:
        if phase.name == "stage2":
            best = self._best(phase="stage1")
            phase.study = self._study("-stage2", self.space.search.seed + 1)
            if best is None:
                self.echo("stage 1 finished no trial: stage 2 searches the whole space")
                phase.sample = lambda trial: sample_trial(self.space, trial)
                return
            selected = selected_methods(best["cfg"])
            self.stage1_selection = selected
            self.echo(f"stage 2: tuning {', '.join(selected) or 'the head alone'} "
                      f"(from stage 1's most accurate trial, {self._name(best)}), and may drop one of them")
            phase.sample = stage2_sampler(self.space, selected)
        elif phase.name == "reevaluate":
            r = self.space.search.reevaluate
            top = self._front()[: r.top]
            for row in top:
                for k in range(1, r.seeds + 1):
                    seeded = TrialConfig.model_validate({**row["cfg"].model_dump(), "seed": row["cfg"].seed + k})
                    phase.queue.append((seeded, row["number"]))
            phase.budget = len(phase.queue)
            if top:
                self.echo(f"re-evaluating the {len(top)} best front configurations with {r.seeds} more "
                          f"seed(s) each ({phase.budget} trials at the full budget)")

    @staticmethod
    def _name(row: dict[str, Any] | None) -> str:
        return "none" if row is None else f"trial-{row['number']:03d}"

    def _best(self, phase: str | None = None) -> dict[str, Any] | None:
        rows = [r for r in self.results
                if r["phase"] == phase or (phase is None and r["phase"] not in REFERENCE_PHASES)]
        best = None
        for r in rows:
            if best is None or better(self.quality, r[self.quality], best[self.quality]) or (
                    r[self.quality] == best[self.quality] and r["trainable_params"] < best["trainable_params"]):
                best = r
        return best

    def _front(self) -> list[dict[str, Any]]:
        """Finished configurations on the Pareto front of the objectives, most accurate first."""
        from search.pareto import pareto_indices

        rows = [r for r in self.results if r["phase"] not in REFERENCE_PHASES]
        front = [rows[i] for i in pareto_indices(rows, self.objectives)]
        sign = -1.0 if self._direction() == "max" else 1.0
        return sorted(front, key=lambda r: (sign * r[self.quality], r["trainable_params"]))

    # -- Ray Tune's Searcher interface ------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> Any:  # a config dict, None (not now) or Searcher.FINISHED
        while True:
            if self.relaunch:  # proposals that waited on a running twin whose run then failed: trained now
                ot, phase, cfg, size = self.relaunch.pop(0)
                return self._launch(trial_id, phase, cfg, ot, ot.params, size, None)
            if self.reruns:  # in flight when the search stopped: trained again, under the same numbers
                return self._launch_rerun(trial_id, self.reruns.pop(0))
            if self.current >= len(self.phases):
                self.done = True
                return Searcher.FINISHED
            phase = self.phases[self.current]
            if phase.proposed >= phase.budget:
                if phase.name != "baseline" and any(live.phase == phase.name for live in self.live.values()):
                    return None  # the next phase needs this one's results (nothing needs the baselines')
                if self.current + 1 < len(self.phases) and self._out_of_time():
                    self.done = True
                    return Searcher.FINISHED  # said why; the next phase is not started
                self._advance()
                continue
            if self._out_of_time() or self._too_many_failures():
                self.done = True
                return Searcher.FINISHED
            if phase.name in REFERENCE_PHASES:
                cfg, of = phase.queue[phase.proposed]
                phase.proposed += 1
                return self._launch(trial_id, phase, cfg, None, {}, self.sizes.trainable(cfg), of,
                                    slot=phase.proposed - 1)
            config = self._propose(trial_id, phase)
            if config is not None:
                return config

    def _propose(self, trial_id: str, phase: Phase) -> dict[str, Any] | None:
        assert phase.study is not None and phase.sample is not None
        ot = phase.study.ask()
        phase.proposed += 1
        try:
            cfg = phase.sample(ot)
            size = self.sizes.trainable(cfg)
        except Exception as exc:  # a proposal that cannot become a trial fails alone, not the search
            self._fail_proposal(ot, phase, exc)
            return None
        key = config_key(cfg)
        ot.set_user_attr(SIZE_ATTR, size)
        ot.set_user_attr(KEY_ATTR, key)
        if self.limit is not None:
            ot.set_constraint(CONSTRAINT, float(size - self.limit))  # > 0: infeasible, for every sampler
        if self.limit is not None and size > self.limit:
            values = [penalty(m, size, self.base_params) for m in self.objectives]
            self._settle(ot, phase, cfg, "rejected", TrialState.COMPLETE, values, {"trainable_params": size},
                         f"{size:,} trainable parameters is above search.max_trainable {self.limit:,}")
            return None
        if key in self.outcomes:
            self._settle_duplicate(ot, phase, cfg, self.outcomes[key])
            return None
        if any(live.key == key and live.ot is not None for live in self.live.values()):
            self.pending.setdefault(key, []).append((ot, phase, cfg, size))  # settled when its twin ends
            return None
        return self._launch(trial_id, phase, cfg, ot, ot.params, size, None)

    def _fail_proposal(self, ot: optuna.trial.Trial, phase: Phase, exc: Exception) -> None:
        self.number += 1
        note = f"could not be built: {type(exc).__name__}: {exc}"
        ot.set_user_attr(STATE_ATTR, "failed")
        ot.set_user_attr(NUMBER_ATTR, self.number)
        ot.set_user_attr("mps_note", note[:2000])
        assert phase.study is not None
        phase.study.tell(ot, None, state=TrialState.FAIL)
        self.echo(f"trial-{self.number:03d} failed: {note}")
        self._completed()

    def _settle_duplicate(self, ot: optuna.trial.Trial, phase: Phase, cfg: TrialConfig,
                          first: dict[str, Any]) -> None:
        name = f"trial-{first['number']:03d}"
        if first["state"] == "finished":
            values = [first["metrics"][m] for m in self.objectives]
            self._settle(ot, phase, cfg, "duplicate", TrialState.COMPLETE, values, first["metrics"],
                         f"same configuration as {name}; its result is reused")
        else:
            self._settle(ot, phase, cfg, "duplicate", TrialState.PRUNED, None, {},
                         f"same configuration as {name}, which was pruned at step {first['step']}; not trained again")

    def _launch(self, trial_id: str, phase: Phase, cfg: TrialConfig, ot: optuna.trial.Trial | None,
                params: dict[str, Any], size: int, of: int | None, number: int | None = None,
                slot: int | None = None) -> dict[str, Any]:
        if number is None:
            self.number += 1
            number = self.number
        if ot is not None:
            ot.set_user_attr(STATE_ATTR, "running")
            ot.set_user_attr(NUMBER_ATTR, number)
            ot.set_user_attr(TRIAL_ATTR, cfg.model_dump_json())
        self.live[trial_id] = Live(number, phase.name, cfg, config_key(cfg), size, ot, self.clock(), slot=slot)
        return {"trial": cfg.model_dump_json(), "number": number, "phase": phase.name, "params": params,
                "summary": cfg.summary(), "trainable_params": size, "reevaluates": of, "slot": slot}

    def _settle(self, ot: optuna.trial.Trial, phase: Phase, cfg: TrialConfig, state: str, tell: TrialState,
                values: list[float] | None, metrics: dict[str, Any], note: str) -> None:
        self.number += 1
        ot.set_user_attr(STATE_ATTR, state)
        ot.set_user_attr(NUMBER_ATTR, self.number)
        ot.set_user_attr("mps_note", note)
        assert phase.study is not None
        phase.study.tell(ot, values, state=tell)
        self.recorder.settled(self.number, phase.name, cfg, dict(ot.params), state, metrics, note)
        self._completed()

    def _completed(self) -> None:
        """One more searched trial is over (in any state): log the hypervolume of the front so far."""
        self.completed += 1
        self.recorder.hypervolume(self.completed, self.hypervolume())

    def _too_many_failures(self) -> bool:
        limit = self.space.search.max_failures
        if limit is None or self.stop_reason is not None:
            return self.stop_reason is not None and self.stop_reason.startswith("search.max_failures")
        allowed = limit if isinstance(limit, int) else limit * self.space.search.num_trials
        if self.failures <= allowed:
            return False
        self.stop_reason = (f"search.max_failures {limit}: {self.failures} trials failed, so no more are started "
                            f"(the reasons are on the terminal above and in each failed run's error.txt)")
        self.echo(self.stop_reason)
        return True

    def _out_of_time(self) -> bool:
        budget = self.space.search.time_budget
        if budget is None:
            return False
        elapsed = self.clock() - self.start
        typical = statistics.median(self.durations) if self.durations else 0.0
        if elapsed + typical <= budget:
            return False
        if self.stop_reason is None:
            self.stop_reason = (f"time budget {budget:.0f} s: stopped starting trials after {elapsed:.0f} s (a trial "
                                f"takes about {typical:.0f} s at the full budget); the trials already running "
                                "finish")
            self.echo(self.stop_reason)
        return True

    def rung(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record a rung report in the trial's Optuna attributes; True when the study's pruner prunes it."""
        live = self.live.get(trial_id)
        if live is None or result.get(FINISHED) or "step" not in result:
            return False
        live.last_step = int(result["step"])
        value = result.get(self.quality)
        if live.ot is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False  # re-evaluation seeds train to the end; a non-finite value fails the trial itself
        study = live.ot.study
        record_rung(study, live.ot._trial_id, live.last_step, float(value))
        frozen = study._storage.get_trial(live.ot._trial_id)
        if study.pruner.prune(study, frozen):
            self.pruned[trial_id] = live.last_step
            return True
        return False

    def note_error(self, trial_id: str, reason: str) -> None:
        """The failure reason of a trial (exception type and message), told before Ray completes it with an error
        (``RungScheduler.on_trial_error``); it goes into the Optuna trial's attributes with the FAIL."""
        self.errors[trial_id] = reason

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # rung reports reach ``rung`` through RungScheduler, which decides before Ray calls this

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self.live.pop(trial_id, None)
        if live is None:
            return
        if result is not None and FAILED in result:  # the trial's own code raised (search.faults)
            error = True
            self.errors[trial_id] = str(result[FAILED])
        finished = bool(result and result.get(FINISHED))
        steps = self.max_steps if finished else live.last_step
        self.steps_trained += steps
        if steps:
            self.durations.append((self.clock() - live.started) * self.max_steps / steps)
        values = [result[m] for m in self.objectives] if finished and result is not None else None
        if values is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            self.echo(f"trial-{live.number:03d}: an objective is not finite ({values}); recorded as failed")
            error, finished, values = True, False, None
        if error:
            state, tell = "failed", TrialState.FAIL
            if live.phase not in REFERENCE_PHASES:
                self.failures += 1
            reason = self.errors.pop(trial_id, None)
            if live.ot is not None and reason is not None:
                live.ot.set_user_attr(ERROR_ATTR, reason[:2000])
        elif finished:
            state, tell = "finished", TrialState.COMPLETE
        elif trial_id in self.pruned:
            state, tell = "pruned", TrialState.PRUNED
            self.steps_saved += self.max_steps - self.pruned[trial_id]
        else:
            state, tell = "interrupted", TrialState.FAIL
        self.states[trial_id] = state
        if finished and result is not None:
            metrics = {k: result[k] for k in (*self.objectives, test_metric(self.quality)) if k in result}
            self.results.append({"number": live.number, "phase": live.phase, "cfg": live.cfg, **metrics,
                                 "trainable_params": live.size})
        if live.ot is not None:
            live.ot.set_user_attr(STATE_ATTR, state)
            if finished:
                live.ot.set_user_attr(METRICS_ATTR, metrics)
            live.ot.study.tell(live.ot, values, state=tell)
            if state in ("finished", "pruned"):
                outcome = {"number": live.number, "state": state, "step": live.last_step,
                           "metrics": metrics if finished else {}}
                self.outcomes.setdefault(live.key, outcome)
            for ot, phase, cfg, size in self.pending.pop(live.key, []):
                if live.key in self.outcomes:
                    self._settle_duplicate(ot, phase, cfg, self.outcomes[live.key])
                else:  # its twin failed or was interrupted: this one is trained after all
                    self.relaunch.append((ot, phase, cfg, size))
        if live.phase not in REFERENCE_PHASES:
            self._completed()

    def exhausted(self) -> bool:
        """Every phase has proposed its budget and nothing runs or waits: the search is complete even if Ray
        stopped asking (it stops at its sample count without a last ``suggest``)."""
        if self.done:
            return True
        if self.live or self.pending or self.relaunch or self.reruns:
            return False
        if self.current >= len(self.phases):
            return True
        # A phase is current only once it is set up (re-evaluation's budget is known then): the last one, spent.
        return self.current == len(self.phases) - 1 and self.phases[-1].proposed >= self.phases[-1].budget

    def interrupt(self) -> list[str]:
        """Mark every trial still running as interrupted (Ray was stopped, e.g. by Ctrl-C); their Ray ids."""
        ids = list(self.live)
        for trial_id in ids:
            self.on_trial_complete(trial_id, result=None)
        for waiting in [*self.pending.values(), self.relaunch]:
            for ot, phase, _, _ in waiting:
                ot.set_user_attr(STATE_ATTR, "interrupted")
                assert phase.study is not None
                phase.study.tell(ot, None, state=TrialState.FAIL)
        self.pending.clear()
        self.relaunch.clear()
        return ids

    # -- resume ---------------------------------------------------------------------------------------------------
    def resume(self, records: list[TrialRecord], spent: float = 0.0) -> list[Rerun]:
        """Continue a stopped search from what its Optuna studies and MLflow runs hold; the trials to run again.

        The search is rebuilt from those records rather than restored with Ray's ``Tuner.restore``. Optuna's
        storage holds every searched trial with its state (``mps_state``), number, configuration and rung values,
        written as each event happens; MLflow holds every run, the re-evaluation and baseline ones included. Ray's
        experiment state is a snapshot written every few seconds, so after ``kill -9`` it can miss the last trials
        started, and restoring it would also unpickle a searcher bound to the dead driver's Ray actors and MLflow
        client. So the resumed search is a new Ray experiment (``<search>-resume-N``) in the same MLflow search run
        and the same studies:
        - trials that ended (finished, pruned, failed, duplicate, rejected) are kept and count toward their phase's
          budget; finished ones feed the front, stage 2's choice of methods, the re-evaluation and duplicates;
        - trials still running in Optuna (the driver was killed) are told FAIL with state ``interrupted``; every
          interrupted trial without a later ending is trained again first, under its number, as a new Optuna
          trial with the same parameters (so Optuna and MLflow hold one trial per run);
        - a proposal that never got a number (asked, or waiting on a running twin, when the driver stopped) is told
          FAIL and proposed afresh: it never used the phase's budget;
        - the phases are set up again in order up to the first one not done, as the uninterrupted search would
          have (stage 2 from stage 1's best trial, the re-evaluation from the front).
        ``spent`` is the seconds the search already ran, which ``search.time_budget`` counts too."""
        self.records = {}
        for r in records:
            self.records.setdefault(r.phase, []).append(r)
        self.number = max([self.number, *(r.number for r in records)])
        self.start = self.clock() - spent
        self.current = 0
        self._restore(self.phases[0])
        while self.current + 1 < len(self.phases) and self._spent(self.phases[self.current]):
            self._advance()
        return list(self.reruns)

    def _spent(self, phase: Phase) -> bool:
        return phase.proposed >= phase.budget and not any(r.phase is phase for r in self.reruns)

    def _restore(self, phase: Phase) -> None:
        assert self.records is not None
        if phase.study is not None:
            self._restore_study(phase)
        else:
            self._restore_queue(phase, self.records.get(phase.name, []))

    def _restore_study(self, phase: Phase) -> None:
        assert phase.study is not None and self.records is not None
        study = phase.study
        runs = {r.number for r in self.records.get(phase.name, [])}
        by_number: dict[int, list[optuna.trial.FrozenTrial]] = {}
        for t in study.get_trials(deepcopy=False):
            number = t.user_attrs.get(NUMBER_ATTR)
            if t.state == TrialState.RUNNING:  # the driver died with it in flight
                study._storage.set_trial_user_attr(t._trial_id, STATE_ATTR, "interrupted")
                study.tell(t.number, None, state=TrialState.FAIL)
                t = study._storage.get_trial(t._trial_id)
            if number is not None:
                by_number.setdefault(int(number), []).append(t)
        phase.proposed = len(by_number)
        self.number = max([self.number, *by_number])  # a number Optuna gave out before the driver died
        for number, tries in sorted(by_number.items()):
            ended = [t for t in tries if t.user_attrs.get(STATE_ATTR) in FINAL_STATES]
            if ended:
                self._account(phase, number, ended[-1])
                continue
            last = tries[-1]
            cfg = TrialConfig.model_validate_json(last.user_attrs[TRIAL_ATTR])
            if number not in runs:  # started in Optuna, killed before its MLflow run: it gets one, interrupted
                self.recorder.settled(number, phase.name, cfg, dict(last.params), "interrupted", {},
                                      "in flight when the search stopped; run again")
            self.reruns.append(Rerun(phase, number, cfg, int(last.user_attrs.get(SIZE_ATTR, 0)), frozen=last))

    def _account(self, phase: Phase, number: int, t: optuna.trial.FrozenTrial) -> None:
        """An ended trial of a resumed search, counted as ``on_trial_complete`` or ``_settle`` counted it."""
        state = t.user_attrs[STATE_ATTR]
        self.completed += 1
        if state == "failed":
            self.failures += 1
        if state not in ("finished", "pruned"):
            return
        key = t.user_attrs[KEY_ATTR]
        if state == "pruned":
            step = max((int(k) for k in t.user_attrs.get(RUNG_ATTR, {})), default=0)
            self.steps_trained += step
            self.steps_saved += self.max_steps - step
            self.outcomes.setdefault(key, {"number": number, "state": state, "step": step, "metrics": {}})
            return
        metrics = t.user_attrs.get(METRICS_ATTR) or dict(zip(self.objectives, t.values or [], strict=False))
        self.steps_trained += self.max_steps
        self.outcomes.setdefault(key, {"number": number, "state": state, "step": self.max_steps, "metrics": metrics})
        if TRIAL_ATTR in t.user_attrs:  # every launched trial has it, but for searches from before resume existed
            self.results.append({"number": number, "phase": phase.name,
                                 "cfg": TrialConfig.model_validate_json(t.user_attrs[TRIAL_ATTR]), **metrics,
                                 "trainable_params": int(t.user_attrs.get(SIZE_ATTR, 0))})

    def _restore_queue(self, phase: Phase, records: list[TrialRecord]) -> None:
        """A baseline or re-evaluation phase: its queue is rebuilt as it was, and its runs are matched by slot."""
        by_slot: dict[int, list[TrialRecord]] = {}
        for r in records:
            if r.slot is not None:
                by_slot.setdefault(r.slot, []).append(r)
        phase.proposed = min(phase.budget, max(by_slot, default=-1) + 1)
        for slot in range(phase.proposed):
            runs = by_slot.get(slot, [])
            if any(r.state in FINAL_STATES for r in runs):
                self.steps_trained += self.max_steps if any(r.state == "finished" for r in runs) else 0
                continue
            cfg, of = phase.queue[slot]
            self.reruns.append(Rerun(phase, runs[-1].number if runs else None, cfg, self.sizes.trainable(cfg), of,
                                     slot))

    def _launch_rerun(self, trial_id: str, rerun: Rerun) -> dict[str, Any]:
        ot = None
        if rerun.frozen is not None:  # a new Optuna trial with the interrupted one's parameters and attributes
            study = rerun.phase.study
            assert study is not None
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=rerun.frozen.params, distributions=rerun.frozen.distributions,
                user_attrs={k: v for k, v in rerun.frozen.user_attrs.items() if k in (SIZE_ATTR, KEY_ATTR)})
            ot = optuna.trial.Trial(study, study._storage.create_new_trial(study._study_id, template_trial=template))
            if self.limit is not None:
                ot.set_constraint(CONSTRAINT, float(rerun.size - self.limit))
        return self._launch(trial_id, rerun.phase, rerun.cfg, ot, ot.params if ot is not None else {}, rerun.size,
                            rerun.of, number=rerun.number, slot=rerun.slot)

    def hypervolume(self) -> float:
        rows = [r for r in self.results if r["phase"] not in REFERENCE_PHASES]
        return search_hypervolume(rows, self.quality, self.size, self.base_params)

    def state_of(self, trial_id: str) -> str:
        """The state of a Ray trial once Ray has stopped it (``pruned`` is known from the rung it was pruned at)."""
        if trial_id in self.states:
            return self.states[trial_id]
        return "pruned" if trial_id in self.pruned else "interrupted"

    def save(self, checkpoint_path: str) -> None:
        # The Optuna storage holds the studies; this is a readable summary of where the search stands.
        with open(checkpoint_path, "w") as f:
            json.dump({"phase": self.current, "proposed": [p.proposed for p in self.phases],
                       "numbers": self.number, "steps_saved": self.steps_saved,
                       "steps_trained": self.steps_trained}, f)

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search resumes from Optuna and MLflow (PeftSearcher.resume, search.run "
                                  "--resume), not from Ray's checkpoint")


class RungScheduler(FIFOScheduler):
    """Stops a trial when the searcher's Optuna pruner prunes it at a rung; otherwise first in, first out."""

    def __init__(self, searcher: PeftSearcher) -> None:
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return TrialScheduler.STOP if self.searcher.rung(trial.trial_id, result) else TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        # Ray calls this before the searcher's on_trial_complete(error=True): the reason reaches the Optuna trial.
        self.searcher.note_error(trial.trial_id, error_reason(error_text(trial)))
        super().on_trial_error(tune_controller, trial)
