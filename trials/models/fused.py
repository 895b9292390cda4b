"""mamba-ssm's fused CUDA kernels: whether they can run here, which path each CUDA forward took, and why.

``import mamba_ssm`` succeeding is not enough: mamba-ssm imports causal-conv1d's compiled functions inside a
``try`` and leaves them ``None`` when they are missing (causal-conv1d older than 1.5.1 has no ``cpp_functions``,
which mamba-ssm 2.2.5 and later call), and an extension built against another torch fails with an "undefined
symbol" ImportError. ``mamba1_kernel`` and ``mamba2_kernel`` therefore probe the compiled pieces themselves and say
what is missing.

A mixer on CUDA calls ``choose``: the fused kernel when it is there and nothing blocks it, else the torch path with
the reason, said once per process at WARNING (a Ray worker's warnings reach the search's terminal) and kept in the
ledger that ``kernel_label`` reads for the trial's record (``mps.kernel``: ``fused`` or ``torch: <reasons>``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# The compiled functions each fused entry point needs, by the name its module binds them to (mamba-ssm 2.2.5+ uses
# causal-conv1d's ``cpp_functions``; older releases the ``causal_conv1d_cuda`` extension). A name the module does
# not bind is a name its version does not use.
CONV_NAMES = ("causal_conv1d_fwd_function", "causal_conv1d_cuda")
FUSED = "fused"

_ledger: dict[str, int] = {}  # path -> CUDA forwards that took it since ``reset``
_warned: set[str] = set()


def _probe(module_name: str, entry: str, compiled: Sequence[str]) -> tuple[Callable[..., Any] | None, str]:
    """``(entry function, "")`` when ``module_name`` imports with every compiled piece, else ``(None, reason)``."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # not installed, or an extension built against another torch ("undefined symbol")
        return None, f"mamba-ssm cannot be imported ({type(exc).__name__}: {exc})"
    bound = [name for name in CONV_NAMES if name in vars(module)]
    if bound and all(getattr(module, name) is None for name in bound):
        return None, (f"causal-conv1d's compiled functions are missing ({module_name}.{bound[0]} is None; "
                      "install causal-conv1d>=1.5.1 built for this torch)")
    for name in compiled:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return None, f"mamba-ssm's compiled {name} cannot be imported ({exc})"
    fn = getattr(module, entry, None)
    if fn is None:
        return None, f"{module_name} has no {entry} (an unsupported mamba-ssm version)"
    return fn, ""


@functools.cache
def mamba1_kernel() -> tuple[Callable[..., Any] | None, str]:
    """mamba-ssm's ``mamba_inner_fn`` (conv, x_proj, dt_proj, scan and out_proj in one), or None and why."""
    return _probe("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn", ("selective_scan_cuda",))


@functools.cache
def mamba2_kernel() -> tuple[Callable[..., Any] | None, str]:
    """mamba-ssm's ``mamba_split_conv1d_scan_combined`` (Mamba-2's conv, SSD scan, gated norm and out_proj), or
    None and why."""
    return _probe("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined", ())


def choose(mixer: str, kernel: tuple[Callable[..., Any] | None, str], blockers: Sequence[str]
           ) -> Callable[..., Any] | None:
    """The fused function for a CUDA forward of ``mixer`` (a class name), or None for the torch path: when the kernel
    is missing, or ``blockers`` (what this forward needs that the kernel does not take) is not empty. Records the
    path and warns once per reason."""
    fn, missing = kernel
    reason = missing or "; ".join(blockers)
    if fn is not None and not blockers:
        _ledger[FUSED] = _ledger.get(FUSED, 0) + 1
        return fn
    path = f"torch: {reason}"
    _ledger[path] = _ledger.get(path, 0) + 1
    if path not in _warned:
        _warned.add(path)
        log.warning("%s runs the torch scan on CUDA, not mamba-ssm's fused kernel: %s", mixer, reason)
    return None


def for_cuda_forward(mixer: Any, kernel: Callable[..., Any] | None,
                     probe: Callable[[], tuple[Callable[..., Any] | None, str]], blockers: Sequence[str]
                     ) -> Callable[..., Any] | None:
    """``choose`` for a CUDA forward of ``mixer`` (its ``scan_impl`` and class name), handed its ``kernel`` (None when
    the mixer module withholds it) and the ``probe`` that says why a missing one is missing. ``model.scan:
    compiled`` is the CPU kernel: an error here, not a silent torch scan."""
    if mixer.scan_impl == "compiled":
        raise ValueError("model.scan: 'compiled' is the CPU kernel and cannot run on CUDA; use auto (mamba-ssm's "
                         "fused kernel where it can run) or torch")
    missing = "" if kernel is not None else (probe()[1] or "the fused kernel is withheld")
    return choose(type(mixer).__name__, (kernel, missing), blockers)


def reset() -> None:
    """Start a trial's ledger (a reused Ray worker runs many trials in one process)."""
    _ledger.clear()


def kernel_label() -> str | None:
    """The paths CUDA forwards took since ``reset``: ``fused``, ``torch: <reason>[; ...]``, or None when none ran."""
    if not _ledger:
        return None
    torch_paths = sorted(p.removeprefix("torch: ") for p in _ledger if p != FUSED)
    if not torch_paths:
        return FUSED
    mixed = f" ({_ledger[FUSED]} forwards fused)" if FUSED in _ledger else ""
    return "torch: " + "; ".join(torch_paths) + mixed
