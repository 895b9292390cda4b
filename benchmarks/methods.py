"""Per-method cost against full fine-tuning, side by side in one run.

    python -m benchmarks.methods [--configs tiny wide] [--length 64] [--batch 16] [--threads 1]

For every registered method (with the default config of its search space) and for full fine-tuning of the
same model, on the embedded tiny pretrained Mamba and on a randomly initialised wider one (hidden 768,
4 layers), it measures in a fresh process each: trainable parameters, fwd+bwd+optimiser step time and peak
memory, then prints each method relative to full fine-tuning.
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

FULL = "full"
CONFIGS = ("tiny", "wide")


def build(config: str) -> Any:
    from transformers import MambaConfig, MambaForCausalLM

    from trials.models.loading import load_base_model, quiet_transformers, use_scan

    quiet_transformers()
    if config == "tiny":
        return load_base_model("embedded-tiny")
    cfg = MambaConfig(vocab_size=288, hidden_size=768, num_hidden_layers=4, state_size=16, expand=2)
    return use_scan(MambaForCausalLM(cfg), "auto")


def benchmark_config(method: str, lm: Any) -> Any:
    """The method's default config; SDT gets the selection a warm-up would give (here from a random A_log delta:
    the cost depends on how many entries are tuned, not on which)."""
    import torch

    from space.methods import METHOD_SPACES, SdtConfig
    from trials.methods.sdt import select_dimensions

    if method != "sdt":
        return METHOD_SPACES[method][1]()
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(layer.mixer.A_log.shape, generator=gen) for layer in lm.backbone.layers]
    return SdtConfig(selection=tuple(select_dimensions(deltas, SdtConfig())))


def run_case(config: str, method: str, length: int, batch: int, threads: int, reps: int) -> dict:
    import torch

    from trials.methods import apply_methods

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = build(config).train()
    if method == FULL:
        params = list(lm.parameters())
    else:
        applied = apply_methods(lm, {method: benchmark_config(method, lm)})
        params = [p for ps in applied.params.values() for p in ps]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> float:
        t = time.perf_counter()
        lm(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()  # warm-up (allocator growth, optimiser state)
    times = [step() for _ in range(reps)]
    return {"params": sum(p.numel() for p in params), "ms": 1000 * statistics.median(times),
            "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def measure(*case: Any) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.methods", "--case", json.dumps(case)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from space.methods import METHOD_SPACES
    from trials.methods.registry import supported

    on_mamba1 = [m for m in METHOD_SPACES if supported(m, "mamba") is None]  # both configs are Mamba-1 models
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--methods", nargs="+", choices=on_mamba1, default=on_mamba1)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(*json.loads(a.case))))
        return
    for config in a.configs:
        full = measure(config, FULL, a.length, a.batch, a.threads, a.reps)
        print(f"\n== {config}: L={a.length}, batch {a.batch}, {a.threads} thread(s); full fine-tuning "
              f"{full.get('params', 0):,} params, {full.get('ms', float('nan')):.0f} ms/step, "
              f"{full.get('peak_mb', float('nan')):.0f} MB ==", flush=True)
        print(f"{'method':<18} {'params':>10} {'% of full':>9} {'ms/step':>8} {'time/full':>9} {'mem/full':>9}")
        for method in a.methods:
            r = measure(config, method, a.length, a.batch, a.threads, a.reps)
            if "error" in r or "error" in full:
                print(f"{method:<18} error: {r.get('error') or full.get('error')}")
                continue
            mem = r["peak_mb"] / full["peak_mb"] if full["peak_mb"] > 0 else float("nan")
            print(f"{method:<18} {r['params']:>10,} {100 * r['params'] / full['params']:>8.2f}% {r['ms']:>8.0f} "
                  f"{r['ms'] / full['ms']:>9.2f} {mem:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
