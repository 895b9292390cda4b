"""Selective scan for training and evaluation on CPU (Mamba-1, Gu & Dao 2023, Algorithm 2).

Notation: Bt batch, E channels (d_inner), L length, N state size.
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        h: [Bt, E, N]
    y_t = <h_t, C_t> + D * u_t ;  y = y * silu(z)

Three implementations with one signature (``selective_scan``):
- ``compiled``: a fused C kernel (trials/kernels/selective_scan.c) built once per machine with the system C
  compiler and called through ctypes; forward and backward each walk the sequence once per (batch, channel)
  row, so time is linear in L, and only one state per 16-step chunk is kept (the backward recomputes the
  rest), so memory is a fraction of any path that stores every state.
- ``torch``: pure PyTorch, time-major, one fused multiply-add per step in forward and in backward (custom
  autograd), used when no compiler is available.
- ``reference``: the plain sequential loop under autograd; the ground truth for tests, never fast.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Impl = Literal["auto", "compiled", "torch", "reference"]

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "selective_scan.c"
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


# --- the compiled kernel -------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("MPS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mamba-peft-search")
    return Path(root)


def _cpu_key() -> str:
    """Kernels are built with -march=native: key the cache by the CPU's flags so a shared home directory
    on a mixed cluster never loads a binary built for another CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def build_kernel() -> Path:
    """Compile the kernel into the cache (atomically, so concurrent workers never see half a file)."""
    src = KERNEL_SOURCE.read_bytes()
    key = hashlib.sha256(src + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"selective_scan-{key}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = tmp.name
    cmd = [cc, "-O3", "-ffast-math", "-march=native", "-fopenmp", "-shared", "-fPIC", str(KERNEL_SOURCE),
           "-o", tmp_path, "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp_path)
        raise RuntimeError(f"compiling {KERNEL_SOURCE.name} failed: {proc.stderr.strip()[:2000]}")
    os.replace(tmp_path, out)
    return out


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (with ``kernel_error()`` saying why) if it cannot be."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                lib = ctypes.CDLL(str(build_kernel()))
                i64, p, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.scan_forward.argtypes = [p] * 8 + [i64] * 4 + [c_int]
                lib.scan_backward.argtypes = [p] * 13 + [i64] * 4 + [c_int]
                lib.scan_chunk.restype = c_int
                _lib = lib
            except (OSError, RuntimeError) as exc:
                _lib_error = str(exc)
    return _lib


def kernel_error() -> str | None:
    return _lib_error


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _CompiledScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C, h0) without D / z; all inputs fp32 and contiguous."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0):  # u, delta [Bt, E, L]; A [E, N]; Bm, Cm [Bt, L, N]; h0 [Bt, E, N]
        lib = load_kernel()
        assert lib is not None
        bt, e, length = u.shape
        n = A.shape[1]
        y = torch.empty_like(u)  # [Bt, E, L]
        chunk = lib.scan_chunk()
        checkpoints = torch.empty(bt, e, -(-length // chunk), n, dtype=u.dtype)  # [Bt, E, L / chunk, N]
        lib.scan_forward(_ptr(u), _ptr(delta), _ptr(A), _ptr(Bm), _ptr(Cm), _ptr(h0), _ptr(y),
                         _ptr(checkpoints), bt, e, length, n, torch.get_num_threads())
        ctx.save_for_backward(u, delta, A, Bm, Cm, checkpoints)
        ctx.has_h0 = h0 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        lib = load_kernel()
        assert lib is not None
        u, delta, A, Bm, Cm, checkpoints = ctx.saved_tensors
        bt, e, length = u.shape
        n = A.shape[1]
        dy = dy.contiguous().float()
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        da_part = torch.empty(bt, e, n, dtype=u.dtype)  # [Bt, E, N] summed over the batch below
        dB, dC = torch.zeros_like(Bm), torch.zeros_like(Cm)
        dh0 = torch.empty(bt, e, n, dtype=u.dtype)
        lib.scan_backward(_ptr(u), _ptr(delta), _ptr(A), _ptr(Bm), _ptr(Cm), _ptr(checkpoints), _ptr(dy),
                          _ptr(du), _ptr(ddelta), _ptr(da_part), _ptr(dB), _ptr(dC), _ptr(dh0),
                          bt, e, length, n, torch.get_num_threads())
        return du, ddelta, da_part.sum(0), dB, dC, (dh0 if ctx.has_h0 else None)


# --- the pure-PyTorch path -----------------------------------------------------------------------------


class _LinearRecurrence(torch.autograd.Function):
    """H_t = a_t * H_{t-1} + b_t along dim 0 (time-major), with H_{-1} = h0; one fused op per step."""

    @staticmethod
    def forward(ctx, a, b, h0):  # a, b [L, Bt, E, N]; h0 [Bt, E, N] or None
        states = torch.empty_like(b)  # [L, Bt, E, N]
        h = h0 if h0 is not None else torch.zeros_like(b[0])
        for t in range(b.shape[0]):
            h = torch.addcmul(b[t], a[t], h, out=states[t])
        ctx.save_for_backward(a, states, h0)
        return states

    @staticmethod
    def backward(ctx, dstates):
        a, states, h0 = ctx.saved_tensors
        g = torch.empty_like(dstates)  # dLoss/dH_t including the future, [L, Bt, E, N]
        acc = torch.zeros_like(dstates[0])
        for t in range(dstates.shape[0] - 1, -1, -1):
            acc = torch.add(dstates[t], acc, out=g[t]) if t == dstates.shape[0] - 1 else torch.addcmul(
                dstates[t], a[t + 1], acc, out=g[t])
        prev = torch.cat([(h0 if h0 is not None else torch.zeros_like(states[0]))[None], states[:-1]])
        da = g * prev
        dh0 = a[0] * g[0] if h0 is not None else None
        return da, g, dh0


def _torch_scan(u, delta, A, Bm, Cm, h0):  # shapes as in _CompiledScan.forward
    dt = delta.permute(2, 0, 1)  # [L, Bt, E]
    a = torch.exp(dt[..., None] * A)  # [L, Bt, E, N]
    b = (dt * u.permute(2, 0, 1))[..., None] * Bm.transpose(0, 1)[:, :, None, :]  # [L, Bt, E, N]
    states = _LinearRecurrence.apply(a, b, h0)  # [L, Bt, E, N]
    return torch.einsum("lben,bln->bel", states, Cm)  # [Bt, E, L]


# --- the sequential reference --------------------------------------------------------------------------


def _reference_scan(u, delta, A, Bm, Cm, h0):
    bt, e, length = u.shape
    h = h0 if h0 is not None else u.new_zeros(bt, e, A.shape[1])  # [Bt, E, N]
    ys = []
    for t in range(length):
        a_t = torch.exp(delta[:, :, t, None] * A)  # [Bt, E, N]
        h = a_t * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bm[:, None, t, :]  # [Bt, E, N]
        ys.append((h * Cm[:, None, t, :]).sum(-1))  # [Bt, E]
    return torch.stack(ys, dim=-1)  # [Bt, E, L]


# --- the entry point -------------------------------------------------------------------------------------


def resolve_impl(impl: Impl) -> Literal["compiled", "torch", "reference"]:
    if impl == "auto":
        return "compiled" if load_kernel() is not None else "torch"
    if impl == "compiled" and load_kernel() is None:
        raise RuntimeError(f"the compiled selective scan is unavailable: {kernel_error()}")
    return impl


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                   initial_state: torch.Tensor | None = None, impl: Impl = "auto") -> torch.Tensor:
    """The selective scan with mamba-ssm's argument layout.

    u, delta, z: [Bt, E, L]; A: [E, N]; B, C: [Bt, N, L]; D, delta_bias: [E]; initial_state: [Bt or 1, E, N].
    Returns y [Bt, E, L] in u's dtype. The scan itself runs in fp32 (the SSM parameters stay fp32 under
    autocast), as mamba-ssm's kernels do.
    """
    dtype = u.dtype
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, df = u.float(), delta.float()
        if delta_bias is not None:
            df = df + delta_bias.float()[:, None]
        if delta_softplus:
            df = F.softplus(df)
        bt, e, _ = uf.shape
        h0 = None if initial_state is None else initial_state.float().expand(bt, e, A.shape[1]).contiguous()
        Bm = B.float().transpose(1, 2).contiguous()  # [Bt, L, N]
        Cm = C.float().transpose(1, 2).contiguous()  # [Bt, L, N]
        which = resolve_impl(impl)
        if which == "compiled" and uf.device.type == "cpu":
            y = _CompiledScan.apply(uf.contiguous(), df.contiguous(), A.float().contiguous(), Bm, Cm, h0)
        elif which == "reference":
            y = _reference_scan(uf, df, A.float(), Bm, Cm, h0)
        else:
            y = _torch_scan(uf, df, A.float(), Bm, Cm, h0)
        if D is not None:
            y = y + uf * D.float()[:, None]
        if z is not None:
            y = y * F.silu(z.float())
    return y.to(dtype)
