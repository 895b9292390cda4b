"""PEFT-adapted fused path against the stock mamba-ssm path on a CUDA machine (needs the ``cuda`` extra).

    python -m benchmarks.gpu [--config small] [--length 1024] [--batch 16]

Measures training tokens/s (fwd+bwd) side by side in one run for:
- ``stock``: transformers' MambaForCausalLM, whose training forward calls mamba-ssm's ``mamba_inner_fn``;
- ``ours``: the project's mixer (``trials.mixer``) on the same kernels, with LoRA on ``in_proj`` and the
  A_log delta applied, so the kernel receives effective (parametrised) weights;
and prints ours / stock. The target is a ratio of at least 0.85.

    python -m benchmarks.gpu --arch mamba2 [--length 1024] [--batch 8]

The Mamba-2 section (trials.models.mamba2_mixer, a mamba2-130m-sized model by default) measures, side by side:
- ``stock``: transformers' Mamba2ForCausalLM, whose training forward calls ``mamba_split_conv1d_scan_combined``;
- ``ours fused``: the project's mixer with rank-8 deltas on in_proj, conv1d and out_proj and a delta on A_log
  (through ``parametrize``), so the fused kernel receives effective weights;
- ``ours torch``: the same model on the torch SSD path (what a hook the kernel cannot apply falls back to);
with tokens/s and peak memory for each, and checks on a small model that the fused path's outputs and gradients
match the CPU path's.
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


class LowRankDelta(torch.nn.Module):
    """W + B A (rank r, B random so the delta is live): a LoRA-like parametrisation for the benchmark."""

    def __init__(self, weight: torch.Tensor, rank: int = 8) -> None:
        super().__init__()
        out_f, in_f = weight.shape[0], weight[0].numel()
        self.shape = weight.shape
        self.a = torch.nn.Parameter(torch.randn(rank, in_f, device=weight.device) / in_f**0.5)
        self.b = torch.nn.Parameter(torch.randn(out_f, rank, device=weight.device) * 1e-3)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.b @ self.a).view(self.shape).to(w.dtype)


class VectorDelta(torch.nn.Module):
    def __init__(self, p: torch.Tensor) -> None:
        super().__init__()
        self.delta = torch.nn.Parameter(torch.full_like(p, 1e-3))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p + self.delta


def adapted_mamba2(cfg: Any, device: str) -> Any:
    """A Mamba-2 LM with the project's mixer and live deltas on in_proj, conv1d, out_proj and A_log."""
    from torch.nn.utils import parametrize
    from transformers import Mamba2ForCausalLM

    from trials.models.mamba2_mixer import install_fast_mamba2_mixer

    torch.manual_seed(0)
    lm: Any = Mamba2ForCausalLM(cfg)
    install_fast_mamba2_mixer(lm)
    for p in lm.parameters():
        p.requires_grad_(False)
    for layer in lm.backbone.layers:
        m = layer.mixer
        for module in (m.in_proj, m.conv1d, m.out_proj):
            parametrize.register_parametrization(module, "weight", LowRankDelta(module.weight))
        parametrize.register_parametrization(m, "A_log", VectorDelta(m.A_log))
    return lm.to(device).train()


def peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20


def mamba2_main(a: argparse.Namespace) -> None:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    import trials.models.mamba2_mixer as mixer_module

    fused = mixer_module._fused_kernel()
    if not torch.cuda.is_available() or fused is None:
        raise SystemExit("needs a CUDA device and mamba-ssm (pip install -c constraints.txt -e '.[cuda]')")
    # 1. Outputs and gradients of the fused path against the CPU path, on a small model.
    small = Mamba2Config(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_heads=4, head_dim=64,
                         n_groups=1, state_size=64, chunk_size=64, expand=2)
    cpu = adapted_mamba2(small, "cpu")
    ids_small = torch.randint(0, small.vocab_size, (2, 200))
    want = cpu(ids_small, use_cache=False).logits
    want.float().square().mean().backward()
    want_grads = {n: p.grad.clone() for n, p in cpu.named_parameters() if p.grad is not None}
    cpu.zero_grad()
    gpu = cpu.to("cuda")
    got = gpu(ids_small.cuda(), use_cache=False).logits
    got.float().square().mean().backward()
    out_err = ((got.cpu() - want).abs().max() / want.abs().max()).item()
    grad_err = max(((p.grad.cpu() - want_grads[n]).abs().max() / want_grads[n].abs().max().clamp_min(1e-12)).item()
                   for n, p in gpu.named_parameters() if p.grad is not None)
    print(f"fused vs CPU: max relative error outputs {out_err:.2e}, gradients {grad_err:.2e} (want < 1e-2)")
    del cpu, gpu
    # 2. Step time and peak memory.
    cfg = Mamba2Config(vocab_size=50280, hidden_size=a.hidden, num_hidden_layers=a.layers, head_dim=64,
                       num_heads=2 * a.hidden // 64, n_groups=1, state_size=128, chunk_size=256, expand=2)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.length), device="cuda")
    results = {}
    for name in ("stock", "ours fused", "ours torch"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if name == "stock":
            torch.manual_seed(0)
            lm: Any = Mamba2ForCausalLM(cfg)
            lm = lm.to("cuda").train()
        else:
            lm = adapted_mamba2(cfg, "cuda")
        kernel = mixer_module._fused_kernel
        if name == "ours torch":
            mixer_module._fused_kernel = lambda: None
        try:
            results[name] = (tokens_per_second(lm, ids, a.steps), peak_mb())
        finally:
            mixer_module._fused_kernel = kernel
        del lm
    for name, (tps, mb) in results.items():
        print(f"{name:<12} {tps:>12,.0f} tokens/s   peak {mb:,.0f} MiB")
    print(f"ours fused / stock  {results['ours fused'][0] / results['stock'][0]:.3f} (target >= 0.85)")
    print(f"ours fused / ours torch  {results['ours fused'][0] / results['ours torch'][0]:.1f}x")


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
    p.add_argument("--arch", choices=["mamba1", "mamba2"], default="mamba1")
    a = p.parse_args(argv)
    if a.arch == "mamba2":
        mamba2_main(a)
        return
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
