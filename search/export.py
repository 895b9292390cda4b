"""Export a trial's full config from a finished search: ``python -m search.export [-o best.yaml]``.

By default it takes the latest search in the experiment and its best trial on the Pareto front (trials that
trained the full budget; by the mean over seeds where the front was re-evaluated). ``--pick knee`` takes the
front's knee, ``--pick budget=20000`` or ``--pick budget=2%`` the best trial within that size.
``--search RUN_ID`` picks another search, ``--run RUN_ID`` a specific trial.
The output is the trial config that ``python -m trials.train`` trains.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from search import results
from space.config import SpaceError, TrialConfig
from space.secrets import mask


def export(tracking_uri: str, experiment: str, search_run: str | None = None, run: str | None = None,
           pick: str = "best") -> tuple[str, TrialConfig]:
    """The chosen trial's run id and config: ``run``, else the front trial ``pick`` names (``results.pick_trial``)."""
    c = results.client(tracking_uri)
    if run is None:
        info = results.search_info(c, experiment, search_run)
        objectives = list(info["objectives"])
        df = results.trials(c, experiment, info["run_id"])
        front = results.reevaluated(df, results.pareto(df, objectives), objectives)
        if front.empty:
            raise results.ResultsError(f"search {info['name']} ({info['run_id']}) has no finished trials")
        try:
            best = results.pick_trial(front, objectives, pick)
        except ValueError as exc:
            raise results.ResultsError(str(exc)) from None
        if best is None:
            sizes = ", ".join(f"{int(v):,}" for v in sorted(front["trainable_params"])) if "trainable_params" in \
                front else "unknown"
            raise results.ResultsError(f"--pick {pick}: no Pareto trial of search {info['name']} fits that budget "
                                       f"(front sizes: {sizes} trainable parameters)")
        run = str(best["run_id"])
    text = results.trial_config_text(c, run)
    try:
        return run, TrialConfig.from_yaml(text, where=f"run {run} {results.CONFIG_ARTIFACT}")
    except SpaceError as exc:
        raise results.ResultsError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", results.DEFAULT_TRACKING_URI))
    p.add_argument("--experiment", default=results.DEFAULT_EXPERIMENT)
    p.add_argument("--search", help="the search's MLflow run id (default: the latest search)")
    p.add_argument("--run", help="a trial's MLflow run id (default: the Pareto trial --pick names)")
    p.add_argument("--pick", default="best", help="which Pareto trial: best (default), knee, budget=<count> or "
                   "budget=<percent>%% (the best one at most that size)")
    p.add_argument("-o", "--out", type=Path, default=Path("best.yaml"))
    a = p.parse_args(argv)
    try:
        run, cfg = export(a.tracking_uri, a.experiment, a.search, a.run, a.pick)
    except results.ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a.out.write_text(f"# exported from MLflow run {run} ({mask(a.tracking_uri)})\n" + cfg.to_yaml())
    print(f"wrote {a.out}: {cfg.summary()} (run {run}); train it with `python -m trials.train {a.out}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
