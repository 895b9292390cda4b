"""PEFT-adapted fused path against the stock mamba-ssm path on a CUDA machine (needs the ``cuda`` extra).

    python -m benchmarks.gpu [--config small] [--length 1024] [--batch 16]

Measures training tokens/s (fwd+bwd) side by side in one run for:
- ``stock``: transformers' MambaForCausalLM, whose training forward calls mamba-ssm's ``mamba_inner_fn``;
- ``ours``: the project's mixer (``trials.models.mamba1_mixer``) on the same kernels, with LoRA on ``in_proj`` and the
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

    python -m benchmarks.gpu --matrix [--device cuda] [--archs mamba2 bamba] [--methods lora_in_proj sdt]
                             [--length 64] [--batch 4] [--steps 5] [--out matrix.txt]

The matrix runs every method on every architecture (``trials.models.interface.architectures()``; each method where
``supported`` allows it, with its search space's default config and, for SDT, a seeded selection fitted to the
model) on the tiny fixtures of ``trials.models.fixtures``. For each case it:
- applies the method to two identically seeded models and moves one to ``--device``, then moves every adapter
  tensor off its init (seeded), so no output or gradient is trivially equal;
- compares the device model's logits and adapter gradients with the CPU model's (eval mode, so dropout does not
  differ), as max relative errors against a dtype-fitted tolerance;
- times a training step (fwd + bwd + AdamW) on the fused path (``model.scan`` auto: mamba-ssm's kernels where
  installed) and on the torch path (``use_scan(lm, "torch")`` with the fused kernels withheld), with the peak
  CUDA memory of each;
- records which path the fused run took (``fused``, ``partly fused``, ``torch`` or ``transformers`` for a mixer
  the project does not cover) and why a mixer fell back from the fused kernel;
and prints one row per case, then a summary (cases run, mismatches, errors, fallbacks and their reasons); the
same text goes to ``--out``. It exits non-zero when a case mismatches or fails. ``--device cpu`` runs the same
loop on CPU (CPU against CPU is then trivially equal: a smoke test that every case builds and runs).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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


# --- the method x architecture matrix ------------------------------------------------------------------------

# The Mamba-2 mixer logs why it leaves the fused kernel (once per message); Mamba-1's does not.
FUSED_LOGGER = "trials.models.fused"  # where both mixers say why a CUDA forward left the fused kernel
# Max relative error allowed between the device and the CPU model, float32 throughout: the same code on the same
# device is bit-identical up to reduction order; mamba-ssm's Triton kernels multiply in TF32 (10-bit mantissa),
# which leaves ~1e-3 of the largest value.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-2}


@dataclass
class KernelWatch:
    """What the mixers did inside ``watched_kernels``: calls into a fused kernel, and the fallback messages."""

    calls: int = 0
    messages: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, watch: KernelWatch) -> None:
        super().__init__(logging.INFO)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        self.watch.messages.append(record.getMessage())


@contextlib.contextmanager
def watched_kernels(fused: bool = True) -> Iterator[KernelWatch]:
    """Count the calls into mamba-ssm's fused kernels (Mamba-1's and Mamba-2's) and collect the mixers' fallback
    messages; with ``fused=False`` the mixers are handed no kernel, so they take the torch path."""
    import trials.models.fused as fused_paths
    import trials.models.mamba1_mixer as mamba1_mixer
    import trials.models.mamba2_mixer as mamba2_mixer

    watch = KernelWatch()
    originals = mamba1_mixer._cuda_kernels, mamba2_mixer._fused_kernel, set(fused_paths._warned)

    def counted(get_kernel: Callable[[], Any]) -> Callable[[], Any]:
        def get() -> Any:
            kernel = get_kernel() if fused else None
            if kernel is None:
                return None

            def call(*args: Any, **kwargs: Any) -> Any:
                watch.calls += 1
                return kernel(*args, **kwargs)
            return call
        return get

    logger = logging.getLogger(FUSED_LOGGER)
    handler, level = _Collect(watch), logger.level
    mamba1_mixer._cuda_kernels = counted(originals[0])  # type: ignore[method-assign]
    mamba2_mixer._fused_kernel = counted(originals[1])  # type: ignore[method-assign]
    fused_paths._warned.clear()  # each case logs its own fallbacks, not only the first case that meets them
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        mamba1_mixer._cuda_kernels, mamba2_mixer._fused_kernel = originals[:2]  # type: ignore[method-assign]
        fused_paths._warned.clear()
        fused_paths._warned.update(originals[2])
        logger.removeHandler(handler)
        logger.setLevel(level)


def matrix_methods(model_type: str) -> list[str]:
    """Every registered method that ``model_type`` supports, in registry order."""
    from trials.methods.registry import REGISTRY, supported

    return [name for name in REGISTRY if supported(name, model_type) is None]


def matrix_config(method: str, lm: Any, seed: int) -> Any:
    """The method's default config; SDT's with the selection a warm-up would hand it, drawn from seeded random
    warm-up deltas (the cost and the code paths depend on how many entries are tuned, not on which)."""
    from space.methods import METHOD_SPACES, LoraConfig, SdtConfig
    from trials.methods import ModelDims
    from trials.methods.sdt import select_dimensions, select_heads
    from trials.models.interface import mixer_kinds
    from trials.models.loading import arch_of

    cfg = METHOD_SPACES[method][1]()
    if isinstance(cfg, LoraConfig):
        # The default rank 4 does not fit the tiny fixtures' narrowest adapted block (Mamba-1's dt rank, 2).
        return cfg.model_copy(update={"rank": min(cfg.rank, 2)})
    if not isinstance(cfg, SdtConfig):
        return cfg
    gen = torch.Generator().manual_seed(seed)
    mixer = ModelDims.from_model(lm).mixer
    layers = len(mixer_kinds(lm))
    if arch_of(lm).family == "mamba1":
        a_log = [torch.randn(mixer.state_shape, generator=gen) for _ in range(layers)]  # [E, N] each
        selection = select_dimensions(a_log, cfg)
    else:
        a_log = [torch.randn(mixer.heads, generator=gen) for _ in range(layers)]  # [H] each
        conv = [torch.randn(mixer.conv_channels, 1, mixer.conv_kernel, generator=gen)  # [conv_dim, 1, K]
                for _ in range(layers)]
        selection = select_heads(a_log, conv, mixer.head_dim, cfg)
    return cfg.model_copy(update={"selection": tuple(selection)})


def adapted_tiny(model_type: str, method: str, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
    """The tiny fixture of ``model_type`` on the project's mixer (``model.scan`` auto) with ``method`` applied and
    its tensors moved off their init, on CPU; the same ``seed`` gives the same weights. Returns the model and
    the method's tensors in a fixed order."""
    from transformers import AutoModelForCausalLM

    from trials.methods import apply_methods
    from trials.models.fixtures import tiny_config
    from trials.models.loading import use_scan

    config = tiny_config(model_type)
    # At the default 0.02 init the scan's state term is ~1e-6 of the output, below what the comparison can see.
    config.initializer_range = 0.25
    torch.manual_seed(seed)
    lm = use_scan(AutoModelForCausalLM.from_config(config), "auto")
    applied = apply_methods(lm, {method: matrix_config(method, lm, seed)})
    params = [p for ps in applied.params.values() for p in ps]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA's B = 0 would leave A's gradient zero on both sides, equal by construction
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return lm, params


def max_relative_error(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    return ((got.detach().float().cpu() - want.detach().float()).abs().max() / max(scale, 1e-12)).item()


def logits_and_grads(lm: Any, params: list[torch.nn.Parameter], ids: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """Eval-mode logits [Bt, L', V] and the method tensors' gradients of the LM loss."""
    lm.eval().zero_grad(set_to_none=True)
    out = lm(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), [None if p.grad is None else p.grad.detach().clone() for p in params]


def compare(want: tuple[torch.Tensor, list[Any]], got: tuple[torch.Tensor, list[Any]]) -> tuple[float, float]:
    """Max relative error of the logits, and of the gradients: each tensor's against the largest CPU gradient of
    that tensor, floored at 1e-3 of the largest of all (a tensor whose gradient is nearly zero would otherwise
    turn float noise into a large ratio). A gradient present on one side only is an infinite error."""
    logits_want, grads_want = want
    logits_got, grads_got = got
    out_err = max_relative_error(logits_got, logits_want, logits_want.abs().max().item())
    floor = 1e-3 * max((g.abs().max().item() for g in grads_want if g is not None), default=0.0)
    grad_err = 0.0
    for g_got, g_want in zip(grads_got, grads_want, strict=True):
        if (g_got is None) != (g_want is None):
            return out_err, float("inf")
        if g_want is not None:
            grad_err = max(grad_err, max_relative_error(g_got, g_want, max(g_want.abs().max().item(), floor)))
    return out_err, grad_err


def train_step_time(lm: Any, params: list[torch.nn.Parameter], ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Median milliseconds of a training step (fwd + bwd + AdamW) after one warm-up, and the peak CUDA memory in
    MiB during the timed steps (NaN on CPU)."""
    cuda = ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lm.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        sync()
        t = time.perf_counter()
        lm(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    step()  # warm-up: kernel compilation and autotuning, allocator growth, optimiser state
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(steps)]
    return 1000 * statistics.median(times), peak_mb() if cuda else float("nan")


def fallback_reason(watch: KernelWatch) -> str:
    """Why the fused run did not (only) use the fused kernel: what the mixers said (``trials.models.fused``)."""
    return "; ".join(dict.fromkeys(watch.messages))


def path_taken(lm: Any, watch: KernelWatch, device: str) -> tuple[str, str]:
    """The path the fused run of ``lm`` took (``cpu``, ``fused``, ``partly fused``, ``torch``, or ``transformers``
    for a mixer the project's mixers do not cover) and, unless fused, why."""
    from trials.models.loading import arch_of
    from trials.models.mamba2_mixer import FAST_CLASSES

    if torch.device(device).type != "cuda":
        return "cpu", ""
    if arch_of(lm).mixer_class not in {cls.__name__ for cls in FAST_CLASSES} | {"MambaMixer"}:
        return "transformers", "the project's mixer does not cover this mixer"
    path = "torch" if watch.calls == 0 else "partly fused" if watch.messages else "fused"
    return path, "" if path == "fused" else fallback_reason(watch)


def run_case(model_type: str, method: str, device: str, length: int, batch: int, steps: int,
             seed: int) -> dict[str, Any]:
    """One (architecture, method) cell of the matrix: outputs and gradients against CPU, step times, peak memory
    and the path taken (see the module docstring)."""
    from trials.models.loading import use_scan

    row: dict[str, Any] = {"arch": model_type, "method": method}
    try:
        cpu, cpu_params = adapted_tiny(model_type, method, seed)
        lm, params = adapted_tiny(model_type, method, seed)
        lm.to(device)
        row["params"] = sum(p.numel() for p in params)
        ids = torch.randint(3, lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
        want = logits_and_grads(cpu, cpu_params, ids)
        del cpu
        with watched_kernels(fused=True) as watch:
            got = logits_and_grads(lm, params, ids.to(device))
            row["out_err"], row["grad_err"] = compare(want, got)
            row["fused_ms"], row["fused_mb"] = train_step_time(lm, params, ids.to(device), steps)
        use_scan(lm, "torch")
        with watched_kernels(fused=False):
            row["torch_ms"], row["torch_mb"] = train_step_time(lm, params, ids.to(device), steps)
        row["path"], row["reason"] = path_taken(lm, watch, device)
    except Exception as exc:  # one broken case must not hide the others: it is reported as a row and counted
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return row


def row_ok(row: dict[str, Any], tolerance: float) -> bool:
    return "error" not in row and row["out_err"] <= tolerance and row["grad_err"] <= tolerance


HEADER = (f"{'arch':<17} {'method':<18} {'params':>8} {'out err':>8} {'grad err':>8} {'fused ms':>9} "
          f"{'torch ms':>9} {'torch/fused':>11} {'fused MiB':>9} {'torch MiB':>9}  path")


def format_matrix_row(row: dict[str, Any], tolerance: float) -> str:
    head = f"{row['arch']:<17} {row['method']:<18}"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    flag = "" if row_ok(row, tolerance) else "  MISMATCH"
    return (f"{head} {row['params']:>8,} {row['out_err']:>8.1e} {row['grad_err']:>8.1e} {row['fused_ms']:>9.2f} "
            f"{row['torch_ms']:>9.2f} {row['torch_ms'] / row['fused_ms']:>10.2f}x {_mib(row['fused_mb']):>9} "
            f"{_mib(row['torch_mb']):>9}  {row['path']}{flag}")


def _mib(mb: float) -> str:
    return "-" if math.isnan(mb) else f"{mb:.1f}"


def matrix_summary(rows: list[dict[str, Any]], tolerance: float) -> str:
    errors = [r for r in rows if "error" in r]
    mismatches = [r for r in rows if "error" not in r and not row_ok(r, tolerance)]
    lines = [f"{len(rows)} cases run, {len(mismatches)} mismatches (tolerance {tolerance:g}), {len(errors)} errors"]
    lines += [f"  mismatch {r['arch']} {r['method']}: outputs {r['out_err']:.1e}, gradients {r['grad_err']:.1e}"
              for r in mismatches]
    lines += [f"  error {r['arch']} {r['method']}: {r['error']}" for r in errors]
    fell_back: dict[str, list[str]] = {}
    for r in rows:
        if "error" not in r and r["path"] not in ("fused", "cpu"):
            fell_back.setdefault(f"{r['path']}: {r['reason'] or 'no reason logged'}", []).append(
                f"{r['arch']}/{r['method']}")
    if fell_back:
        lines.append("not (only) on the fused kernel:")
        lines += [f"  {reason} -- {', '.join(cases)}" for reason, cases in fell_back.items()]
    return "\n".join(lines)


def run_matrix(device: str, archs: list[str] | None = None, methods: list[str] | None = None, length: int = 64,
               batch: int = 4, steps: int = 5, seed: int = 0, out: Path | None = None,
               tolerance: float | None = None) -> list[dict[str, Any]]:
    """Run the matrix (every supported method on each of ``archs``, or the named ``methods`` where supported),
    print a row per case and the summary, write the same text to ``out``; returns the rows."""
    from trials.models.interface import architectures

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the smoke test)")
    tol = tolerance if tolerance is not None else TOLERANCE[torch.device(device).type]
    lines = [f"method x architecture matrix on {device}: L={length}, batch {batch}, {steps} timed steps, "
             f"seed {seed}", HEADER]
    print("\n".join(lines), flush=True)
    rows = []
    for model_type in archs or list(architectures()):
        for method in matrix_methods(model_type):
            if methods is not None and method not in methods:
                continue
            rows.append(run_case(model_type, method, device, length, batch, steps, seed))
            lines.append(format_matrix_row(rows[-1], tol))
            print(lines[-1], flush=True)
    lines.append(matrix_summary(rows, tol))
    print(lines[-1], flush=True)
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    from transformers import MambaConfig, MambaForCausalLM

    from space.methods import DeltaConfig, LoraConfig
    from trials.methods import apply_methods
    from trials.methods.registry import REGISTRY
    from trials.models.interface import architectures
    from trials.models.loading import use_scan
    from trials.models.mamba1_mixer import _cuda_kernels

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--length", type=int, help="tokens per sequence (default 1024; 64 with --matrix)")
    p.add_argument("--batch", type=int, help="sequences per step (default 8; 4 with --matrix)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; 5 with --matrix)")
    p.add_argument("--arch", choices=["mamba1", "mamba2"], default="mamba1")
    p.add_argument("--matrix", action="store_true", help="every method on every architecture (tiny models)")
    p.add_argument("--device", default="cuda", help="--matrix: where the adapted copy runs (cpu: a smoke test)")
    p.add_argument("--archs", nargs="+", choices=list(architectures()), help="--matrix: these architectures only")
    p.add_argument("--methods", nargs="+", choices=list(REGISTRY), help="--matrix: these methods only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, help="--matrix: max relative error (default by device)")
    p.add_argument("--out", type=Path, help="--matrix: also write the table and summary here")
    a = p.parse_args(argv)
    if a.matrix:
        rows = run_matrix(a.device, a.archs, a.methods, a.length or 64, a.batch or 4, a.steps or 5, a.seed, a.out,
                          a.tolerance)
        tol = a.tolerance if a.tolerance is not None else TOLERANCE[torch.device(a.device).type]
        failed = sum(not row_ok(r, tol) for r in rows)
        if failed:
            raise SystemExit(f"{failed} of {len(rows)} cases mismatched or failed")
        return
    a.length, a.batch, a.steps = a.length or 1024, a.batch or 8, a.steps or 20
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
