"""PEFT-adapted fused path against the stock mamba-ssm path on a CUDA machine (needs the ``cuda`` extra).

    python -m benchmarks.gpu [--config small] [--length 1024] [--batch 16]

Measures training tokens/s (fwd+bwd) side by side in one run for:
- ``stock``: transformers' MambaForCausalLM, whose training forward calls mamba-ssm's ``mamba_inner_fn``;
- ``ours``: the project's mixer (``trials.mixer``) on the same kernels, with LoRA on ``in_proj`` and the
  A_log delta applied, so the kernel receives effective (parametrised) weights;
and prints ours / stock. The target is a ratio of at least 0.85.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def tokens_per_second(lm, ids: torch.Tensor, steps: int) -> float:
    for _ in range(3):
        lm(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        lm(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    return ids.numel() * steps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    from space.methods import DeltaConfig, LoraConfig
    from trials.methods import apply_methods
    from trials.mixer import _cuda_kernels
    from trials.model import use_scan

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or _cuda_kernels() is None:
        raise SystemExit("needs a CUDA device and mamba-ssm (pip install -c constraints.txt -e '.[cuda]')")
    cfg = MambaConfig(vocab_size=50280, hidden_size=a.hidden, num_hidden_layers=a.layers)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.length), device="cuda")
    torch.manual_seed(0)
    stock: Any = MambaForCausalLM(cfg)
    stock = stock.to("cuda").train()
    stock_tps = tokens_per_second(stock, ids, a.steps)
    del stock
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    ours = use_scan(MambaForCausalLM(cfg), "auto")
    apply_methods(ours, {"lora_in_proj": LoraConfig(rank=8), "a_log_delta": DeltaConfig()})
    ours = ours.to("cuda").train()
    ours_tps = tokens_per_second(ours, ids, a.steps)
    print(f"stock mamba-ssm  {stock_tps:,.0f} tokens/s")
    print(f"ours + PEFT      {ours_tps:,.0f} tokens/s")
    print(f"ours / stock     {ours_tps / stock_tps:.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
