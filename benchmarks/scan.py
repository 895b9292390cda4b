"""Selective-scan speed and memory on CPU, every path side by side in one run.

    python -m benchmarks.scan            # tiny and small configs, L = 64, 256, 1024, batch 16, 1 and 2 threads
    python -m benchmarks.scan --quick    # tiny config, L = 64 and 256, 1 thread

For each config, length and thread count it measures fwd+bwd milliseconds per step of a Mamba-1 causal LM
(batch 16, fp32) on: transformers' default loop (``hf_loop``), transformers with ``use_mambapy=True``
(``mambapy``), and this project's mixer with the compiled kernel (``ours``) and with its pure-PyTorch scan
(``ours_torch``). Each case runs in a fresh process (so peak memory is its own); a path slower than
``--budget`` seconds per step is timed once and not run at longer lengths. It prints ours / mambapy ratios,
1024-vs-256 growth, peak-memory ratios, and ours against a FLOP-count lower bound (the model's FLOPs divided by
this machine's measured matmul rate at the same thread count).

The Mamba-2 section (``--sections mamba2``; both sections run by default) measures fwd+bwd milliseconds per step
of a tiny Mamba-2 causal LM (hidden 32, 2 layers, 8 heads x head dim 8, state 4, chunk 8; n_groups 8 as ``tiny``
and 2 as ``tiny-g2``) on transformers' torch path (``hf_torch``: its chunked scan, used where mamba-ssm is
absent) and on the project's mixer (``ours``: trials.models.mamba2_mixer, the SSD scan of trials.models.ssd and
the compiled convolution). Both run in one fresh process per config and length, alternating step by step so that
load from other processes hits both alike, and it prints hf_torch / ours against the 2x target at L = 256.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {"tiny": dict(hidden_size=64, num_hidden_layers=4),
                                     "small": dict(hidden_size=256, num_hidden_layers=8)}
PATHS = {"hf_loop": "hf_loop", "mambapy": "mambapy", "ours": "compiled", "ours_torch": "torch"}
BATCH = 16
VOCAB = 288
STATE = 16
MAMBA2_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=8, state_size=4,
                 chunk_size=8, expand=2),
    "tiny-g2": dict(hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2, state_size=4,
                    chunk_size=8, expand=2),
}
MAMBA2_PATHS = ("hf_torch", "ours")
MAMBA2_TARGET = {256: 2.0}  # ours against transformers' torch path, from the Mamba-2 issue


def build(config: str, scan: str):
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from trials.models.loading import quiet_transformers, use_scan

    quiet_transformers()
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=VOCAB, state_size=STATE, expand=2, **CONFIGS[config])
    return use_scan(MambaForCausalLM(cfg), scan).train()


def model_flops(config: str, length: int) -> float:
    """FLOPs of one fwd+bwd step: 6 per weight per token for the projections, conv and head; the scan's
    elementwise work (about 9 per state element forward, twice that backward)."""
    d = CONFIGS[config]["hidden_size"]
    layers = CONFIGS[config]["num_hidden_layers"]
    e, n, r, k = 2 * d, STATE, -(-d // 16), 4
    per_token_weights = layers * (d * 2 * e + e * (r + 2 * n) + r * e + e * d + e * k) + d * VOCAB
    tokens = BATCH * length
    scan = layers * tokens * e * n * 9 * 3
    return 6.0 * per_token_weights * tokens + scan


def matmul_gflops(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - t) / 1e9


def run_case(config: str, path: str, length: int, threads: int, budget: float, reps: int) -> dict:
    """One measurement in this process (called in a fresh subprocess)."""
    import torch

    torch.set_num_threads(threads)
    lm = build(config, PATHS[path])
    ids = torch.randint(3, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> float:
        t = time.perf_counter()
        lm(ids, labels=ids).loss.backward()
        lm.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    first = step()  # warm-up: first-touch page faults and allocator growth are not the path's speed
    times = [step()] if first >= budget else [step() for _ in range(reps)]
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak_mb, "timed_once": len(times) == 1}


def measure(config: str, path: str, length: int, threads: int, budget: float, reps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scan", "--case", json.dumps([config, path, length, threads, budget, reps])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_mamba2_case(config: str, length: int, threads: int, reps: int) -> dict:
    """Both Mamba-2 paths in this process (called in a fresh subprocess), alternating step by step."""
    import copy

    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from trials.models.loading import quiet_transformers
    from trials.models.mamba2_mixer import install_fast_mamba2_mixer

    quiet_transformers()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, **MAMBA2_CONFIGS[config])).train()
    ours = copy.deepcopy(hf)
    install_fast_mamba2_mixer(ours)
    ids = torch.randint(3, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(0))
    models = {"hf_torch": hf, "ours": ours}
    times: dict[str, list[float]] = {p: [] for p in MAMBA2_PATHS}
    for rep in range(reps + 1):  # the first round is the warm-up
        for path in MAMBA2_PATHS:
            t = time.perf_counter()
            models[path](ids, labels=ids).loss.backward()
            models[path].zero_grad(set_to_none=True)
            if rep:
                times[path].append(time.perf_counter() - t)
    return {p: {"ms": 1000 * statistics.median(v), "min_ms": 1000 * min(v)} for p, v in times.items()}


def measure_mamba2(config: str, length: int, threads: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scan", "--mamba2-case", json.dumps([config, length, threads, reps])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mamba2_section(configs: list[str], lengths: list[int], threads_list: list[int], reps: int) -> list[dict]:
    print(f"\n== Mamba-2: batch {BATCH}, fp32, fwd+bwd ms/step (median of {reps}, alternating) ==", flush=True)
    rows = []
    for threads in threads_list:
        for config in configs:
            for length in lengths:
                row = {"section": "mamba2", "config": config, "L": length, "threads": threads,
                       **measure_mamba2(config, length, threads, reps)}
                rows.append(row)
                print(format_mamba2_row(row), flush=True)
    return rows


def format_mamba2_row(row: dict) -> str:
    head = f"{row['config']:>7} L={row['L']:<5} threads={row['threads']}"
    if "error" in row:
        return f"{head}  error: {row['error']}"
    hf, ours = row["hf_torch"], row["ours"]
    ratio = hf["ms"] / ours["ms"]
    want = MAMBA2_TARGET.get(row["L"])
    target = f" ({_verdict(ratio >= want)} >= {want}x)" if want else ""
    return (f"{head}  hf_torch {hf['ms']:8.1f}  ours {ours['ms']:8.1f}  hf_torch/ours {ratio:.2f}x{target}"
            f"  (fastest steps: {hf['min_ms']:.1f} / {ours['min_ms']:.1f})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--lengths", nargs="+", type=int)
    p.add_argument("--threads", nargs="+", type=int)
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--budget", type=float, default=15.0, help="seconds per step above which a path is timed once")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--sections", nargs="+", choices=["mamba1", "mamba2"], default=["mamba1", "mamba2"])
    p.add_argument("--mamba2-configs", nargs="+", choices=list(MAMBA2_CONFIGS))
    p.add_argument("--mamba2-reps", type=int, default=7, help="alternating steps per path in the Mamba-2 section")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--mamba2-case", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(*json.loads(a.case))))
        return
    if a.mamba2_case:
        print(json.dumps(run_mamba2_case(*json.loads(a.mamba2_case))))
        return
    configs = a.configs or (["tiny"] if a.quick else list(CONFIGS))
    lengths = a.lengths or ([64, 256] if a.quick else [64, 256, 1024])
    threads_list = a.threads or ([1] if a.quick else [1, 2])

    rows: list[dict] = []
    if "mamba1" in a.sections:
        rows += mamba1_section(a, configs, lengths, threads_list)
    if "mamba2" in a.sections:
        rows += mamba2_section(a.mamba2_configs or list(MAMBA2_CONFIGS), a.lengths or [64, 256],
                               a.threads or [1], a.mamba2_reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


def mamba1_section(a: argparse.Namespace, configs: list[str], lengths: list[int],
                   threads_list: list[int]) -> list[dict]:
    rows = []
    print(f"batch {BATCH}, fp32, fwd+bwd ms/step (median of {a.reps}); '*' = timed once after the "
          f"warm-up (slower than {a.budget:g} s/step), '-' = skipped (predicted"
          f" above {4 * a.budget:g} s/step from a shorter length)", flush=True)
    for threads in threads_list:
        rate = matmul_gflops(threads)
        print(f"\n== {threads} thread(s): matmul rate {rate:.1f} GFLOP/s ==", flush=True)
        for config in configs:
            too_slow: set[str] = set()
            last: dict[str, tuple[int, float]] = {}
            for length in lengths:
                row: dict = {"config": config, "L": length, "threads": threads}
                for path in a.paths:
                    if path in too_slow or predicted_seconds(path, last.get(path), length) > 4 * a.budget:
                        row[path] = None
                        continue
                    r = measure(config, path, length, threads, a.budget, a.reps)
                    row[path] = r
                    if r.get("timed_once") or "error" in r:
                        too_slow.add(path)
                    else:
                        last[path] = (length, r["ms"] / 1000)
                bound_ms = 1000 * model_flops(config, length) / (rate * 1e9)
                row["bound_ms"] = bound_ms
                rows.append(row)
                print(format_row(row, a.paths), flush=True)
    print(summary(rows))
    return rows


def predicted_seconds(path: str, last: tuple[int, float] | None, length: int) -> float:
    """Expected seconds per step from the last shorter length: quadratic for transformers' default loop
    (its backward is O(L^2)), linear otherwise."""
    if last is None:
        return 0.0
    prev_length, seconds = last
    growth = length / prev_length
    return seconds * (growth**2 if path == "hf_loop" else growth)


def _ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    return f"{r['ms']:.0f}{'*' if r.get('timed_once') else ''}"


def format_row(row: dict, paths: list[str]) -> str:
    cells = "  ".join(f"{p} {_ms(row.get(p)):>8}" for p in paths)
    mem = "  ".join(f"{p} {row[p]['peak_mb']:.0f}MB" for p in paths if row.get(p) and "peak_mb" in row[p])
    return f"{row['config']:>5} L={row['L']:<5} {cells}  bound {row['bound_ms']:.0f}  | peak {mem}"


def _get(rows: list[dict], config: str, length: int, threads: int) -> dict | None:
    return next((r for r in rows if (r["config"], r["L"], r["threads"]) == (config, length, threads)), None)


def summary(rows: list[dict]) -> str:
    out = ["", "ratios (ours = compiled kernel):"]
    for r in rows:
        ours, mp = r.get("ours"), r.get("mambapy")
        if not ours or "ms" not in ours:
            continue
        parts = [f"{r['config']:>5} L={r['L']:<5} threads={r['threads']}"]
        if mp and "ms" in mp:
            speedup = mp["ms"] / ours["ms"]
            want = TARGET_SPEEDUP.get(r["L"])
            target = f" ({_verdict(speedup >= want)} >= {want}x)" if want else ""
            parts.append(f"mambapy/ours {speedup:.1f}x{target}")
            if mp.get("peak_mb", 0) > 0:
                mem = ours["peak_mb"] / mp["peak_mb"]
                parts.append(f"memory ours/mambapy {mem:.2f} ({_verdict(mem <= 1.0)} <= 1)")
        parts.append(f"ours/bound {ours['ms'] / r['bound_ms']:.1f}x")
        if r["L"] == 1024:
            prev = _get(rows, r["config"], 256, r["threads"])
            if prev and prev.get("ours") and "ms" in prev["ours"]:
                growth = ours["ms"] / prev["ours"]["ms"]
                parts.append(f"ours 1024/256 {growth:.2f}x ({_verdict(growth <= 4.5)} <= 4.5)")
        out.append("  ".join(parts))
    return "\n".join(out)


TARGET_SPEEDUP = {64: 2.0, 256: 3.0}  # ours against mambapy, from the fast-scan issue


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


if __name__ == "__main__":
    main()
