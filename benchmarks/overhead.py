"""Orchestration overhead of a search: its wall time against the time its trials took themselves.

    python -m benchmarks.overhead [--trials 6] [--steps 240] [--concurrency 2]

Runs one search of the embedded default (digits, LoRA/A_log on or off and the learning rate searched, so no
proposal repeats another; no pruning, no re-evaluation) through the
real driver (Ray, Optuna, MLflow on sqlite) with trials of roughly 30 s (480 steps), then compares:

- the search's wall time, measured around the driver (Ray start-up, the probe, MLflow runs included), with
- the trials' own times, from their MLflow runs (start to end of each trial run), summed and divided by the
  concurrency: what the search would take if orchestration cost nothing.

It prints both and the overhead ratio ``wall / ideal - 1`` (target: under 5%). Not a timed test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=480, help="each trial's budget (about 30 s on this machine)")
    p.add_argument("--concurrency", type=int, default=2)
    a = p.parse_args(argv)

    from search import results
    from search.run import main as search_main

    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(f"""
name: overhead
model: {{checkpoint: embedded-tiny}}
task: {{name: digits}}
methods: {{lora_in_proj: {{enabled: search, rank: {{choices: [2, 4]}}}}, a_log_delta: {{enabled: search}}}}
training: {{budget: {{rungs: [{a.steps}], max_steps: {a.steps}}}, batch_size: 16,
           learning_rate: {{low: 0.002, high: 0.01, log: true}}}}
search: {{num_trials: {a.trials}, concurrency: {a.concurrency}, pruner: none, reevaluate: {{top: 0}},
          results_dir: {tmp}/runs}}
""")
        t0, t0_wall = time.perf_counter(), time.time()
        code = search_main([str(space)])
        wall, end_wall = time.perf_counter() - t0, time.time()
        c = results.client(f"sqlite:///{tmp}/runs/mlflow.db")
        search_id = results.latest_search(c, "mamba-peft-search")["run_id"]
        df = results.trials(c, "mamba-peft-search", search_id)
        trained = df[~df.status.isin(["duplicate", "rejected"])]  # settled without a Ray trial: no own time
        spans = sorted((c.get_run(r).info.start_time / 1000, c.get_run(r).info.end_time / 1000)
                       for r in trained.run_id if c.get_run(r).info.end_time)
        own = [end - start for start, end in spans]
    ideal = sum(own) / a.concurrency
    # Where the rest went: before the first trial started, after the last one ended, and the time trial slots
    # stood empty between (a slot is empty whenever fewer than `concurrency` trials run).
    before, after = spans[0][0] - t0_wall, end_wall - max(e for _, e in spans)
    busy = sum(own)
    empty = a.concurrency * (max(e for _, e in spans) - spans[0][0]) - busy
    print(f"\nbefore the first trial: {before:.1f} s; after the last: {after:.1f} s; slot time empty between the "
          f"first start and the last end: {empty:.1f} slot-s ({empty / a.concurrency:.1f} s of wall time)")
    print(f"\nsearch exit {code}: {len(own)} trials, each {min(own):.1f} to {max(own):.1f} s on its own")
    print(f"wall time of the search: {wall:.3f} s; trials' own time / concurrency {a.concurrency}: {ideal:.3f} s")
    print(f"overhead_ratio (wall / ideal - 1): {wall / ideal - 1:.3f}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
