"""The searches in an MLflow store, newest first: ``python -m search.list [--tracking-uri URI] [--experiment NAME]``.

One line per search: its MLflow run id (what ``search.export --search`` and the dashboard take), name, state,
its trials counted by state (``space.metrics.TRIAL_STATES``), and when it started and ended. A search whose state
is still ``running`` but whose MLflow run has ended, or that has run longer than it says, is worth a look: the
driver may have been killed.
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from search import results
from space.metrics import TRIAL_STATES


def table(c, experiment: str) -> pd.DataFrame:
    """One row per search of ``experiment``: id, name, state, counts of its trials by state, start and end."""
    rows = []
    for _, s in results.searches(c, experiment).iterrows():
        run = c.get_run(s.run_id)
        df = results.trials(c, experiment, s.run_id)
        counts = df.status.value_counts().to_dict() if not df.empty else {}
        # A resumed search's run is RUNNING again but keeps the end time its stopped driver left.
        ended = run.info.end_time if run.info.status != "RUNNING" else None
        end = pd.to_datetime(ended, unit="ms") if ended else None
        rows.append({"search": s.run_id, "name": s["name"], "state": s.status or "running",
                     "trials": len(df), **{state: int(counts.get(state, 0)) for state in TRIAL_STATES},
                     "started": s.start_time.strftime("%Y-%m-%d %H:%M"),
                     "ended": end.strftime("%Y-%m-%d %H:%M") if end is not None else "-"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.list", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", results.DEFAULT_TRACKING_URI))
    p.add_argument("--experiment", default="mamba-peft-search")
    a = p.parse_args(argv)
    try:
        df = table(results.client(a.tracking_uri), a.experiment)
    except results.ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if df.empty:
        print(f"experiment {a.experiment!r} has no searches")
        return 0
    shown = df.loc[:, (df != 0).any(axis=0)]  # leave out states no search has trials in
    print(shown.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
