"""Selective scan for training and evaluation on CPU (Mamba-1, Gu & Dao 2023, Algorithm 2).

Notation: Bt batch, E channels (d_inner), L length, N state size.
    delta_t = softplus(dt_t + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t        h: [Bt, E, N]
    y_t = (<h_t, C_t> + D * u_t) * silu(z_t)

Three implementations with one signature (``selective_scan``):
- ``compiled``: a fused C kernel (trials/models/kernels/selective_scan.c) built once per machine with the system C
  compiler and called through ctypes. It works in the token-major layout the projections produce (no
  transposes), fuses the dt softplus, the D skip and the silu(z) gate, walks the sequence once forward and
  once backward (time linear in L), and keeps one state per 16-step chunk (the backward recomputes the rest).
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
from typing import Any, Literal

import torch
import torch.nn.functional as F

Impl = Literal["auto", "compiled", "torch", "reference"]

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "selective_scan.c"
# -ffast-math lets the state loop vectorise (with glibc's vector expf); 512-bit vectors hold N = 16 at once.
CFLAGS = ("-O3", "-ffast-math", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC")
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
    key = hashlib.sha256(src + " ".join(CFLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"selective_scan-{key}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = tmp.name
    cmd = [cc, *CFLAGS, str(KERNEL_SOURCE), "-o", tmp_path, "-lm"]
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
                signatures: dict[str, list[Any]] = {
                    "scan_forward": [p] * 11 + [c_int] + [i64] * 4 + [c_int],
                    "scan_backward": [p] * 19 + [c_int] + [i64] * 4 + [c_int],
                    "conv_forward": [p, i64, p, p, p, c_int] + [i64] * 4 + [c_int],
                    "conv_backward": [p, i64, p, p, p, p, p, p, c_int] + [i64] * 4 + [c_int],
                }
                for name, argtypes in signatures.items():
                    getattr(lib, name).argtypes = argtypes
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
    """The fused kernel: y = (scan + D x) * silu(z) with dt = softplus(dt_raw + dt_bias), token-major."""

    @staticmethod
    def forward(ctx, x, dt_raw, A, Bm, Cm, D, z, dt_bias, h0, softplus):
        # x, dt_raw, z: [Bt, L, E]; A: [E, N]; Bm, Cm: [Bt, L, N]; D, dt_bias: [E]; h0: [Bt, E, N]
        lib = load_kernel()
        assert lib is not None
        bt, length, e = x.shape
        n = A.shape[1]
        y = torch.empty_like(x)  # [Bt, L, E]
        checkpoints = torch.empty(bt, -(-length // lib.scan_chunk()), e, n, dtype=x.dtype)  # [Bt, L/K, E, N]
        lib.scan_forward(_ptr(x), _ptr(dt_raw), _ptr(dt_bias), _ptr(A), _ptr(Bm), _ptr(Cm), _ptr(D), _ptr(z),
                         _ptr(h0), _ptr(y), _ptr(checkpoints), int(softplus), bt, length, e, n,
                         torch.get_num_threads())
        ctx.save_for_backward(x, dt_raw, A, Bm, Cm, D, z, dt_bias, checkpoints)
        ctx.softplus = softplus
        ctx.has = (D is not None, z is not None, dt_bias is not None, h0 is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        lib = load_kernel()
        assert lib is not None
        x, dt_raw, A, Bm, Cm, D, z, dt_bias, checkpoints = ctx.saved_tensors
        has_d, has_z, has_bias, has_h0 = ctx.has
        bt, length, e = x.shape
        n = A.shape[1]
        dy = dy.contiguous().float()
        dx, ddt = torch.empty_like(x), torch.empty_like(x)
        dz = torch.empty_like(x) if has_z else None
        da_part = torch.empty(bt, e, n, dtype=x.dtype)  # [Bt, E, N], summed over the batch below
        dd_part, dbias_part = torch.empty(bt, e, dtype=x.dtype), torch.empty(bt, e, dtype=x.dtype)
        dB, dC = torch.zeros_like(Bm), torch.zeros_like(Cm)
        dh0 = torch.empty(bt, e, n, dtype=x.dtype)
        lib.scan_backward(_ptr(x), _ptr(dt_raw), _ptr(dt_bias), _ptr(A), _ptr(Bm), _ptr(Cm), _ptr(D), _ptr(z),
                          _ptr(checkpoints), _ptr(dy), _ptr(dx), _ptr(ddt), _ptr(dz), _ptr(da_part), _ptr(dB),
                          _ptr(dC), _ptr(dd_part), _ptr(dbias_part), _ptr(dh0), int(ctx.softplus),
                          bt, length, e, n, torch.get_num_threads())
        return (dx, ddt, da_part.sum(0), dB, dC, dd_part.sum(0) if has_d else None, dz,
                dbias_part.sum(0) if has_bias else None, dh0 if has_h0 else None, None)


class _CompiledConv(torch.autograd.Function):
    """Causal depthwise conv (+ SiLU) on token-major x [Bt, L, E], which may be a strided view of in_proj's
    output (its token stride is passed to the kernel, so nothing is copied)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):  # x [Bt, L, E] with x.stride(2) == 1; weight [E, K]; bias [E]
        lib = load_kernel()
        assert lib is not None
        bt, length, e = x.shape
        out = torch.empty(bt, length, e, dtype=x.dtype)
        lib.conv_forward(_ptr(x), x.stride(1), _ptr(weight), _ptr(bias), _ptr(out), int(act), bt, length, e,
                         weight.shape[1], torch.get_num_threads())
        ctx.save_for_backward(x, weight, bias)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, dout):
        lib = load_kernel()
        assert lib is not None
        x, weight, bias = ctx.saved_tensors
        bt, length, e = x.shape
        k = weight.shape[1]
        dout = dout.contiguous().float()
        dx = torch.empty(bt, length, e, dtype=x.dtype)
        dw_part, db_part = torch.empty(bt, e, k, dtype=x.dtype), torch.empty(bt, e, dtype=x.dtype)
        lib.conv_backward(_ptr(x), x.stride(1), _ptr(weight), _ptr(bias), _ptr(dout), _ptr(dx), _ptr(dw_part),
                          _ptr(db_part), int(ctx.act), bt, length, e, k, torch.get_num_threads())
        return dx, dw_part.sum(0), db_part.sum(0) if bias is not None else None, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True,
                impl: Impl = "auto") -> torch.Tensor:
    """``nn.Conv1d(E, E, K, groups=E, padding=K - 1)`` on the first L outputs (then SiLU when ``silu``), on
    token-major x [Bt, L, E] with weight [E, 1, K].

    Computed in fp32 with autocast off, like the scan it feeds; the result has the dtype x and weight promote
    to, so under autocast (bf16 x, fp32 master weight) the scan receives the fp32 output unrounded.
    """
    which = resolve_impl(impl)
    dtype = torch.result_type(x, weight)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()  # a no-op (the strided view itself) when x is already fp32
        w = weight[:, 0, :].float()  # [E, K]
        b = None if bias is None else bias.float()
        if which == "compiled" and x.device.type == "cpu" and xf.stride(2) == 1:
            out = _CompiledConv.apply(xf, w.contiguous(), None if b is None else b.contiguous(), silu)
            return out.to(dtype)
        k, length = w.shape[1], xf.shape[1]
        padded = F.pad(xf, (0, 0, k - 1, 0))  # [Bt, L + K - 1, E]
        out = padded[:, :length] * w[:, 0]
        for i in range(1, k):
            out = torch.addcmul(out, padded[:, i : i + length], w[:, i])  # [Bt, L, E]
        if b is not None:
            out = out + b
        out = F.silu(out) if silu else out
    return out.to(dtype)


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
        last = dstates.shape[0] - 1
        acc = g[last].copy_(dstates[last])
        for t in range(last - 1, -1, -1):
            acc = torch.addcmul(dstates[t], a[t + 1], acc, out=g[t])  # g_t = dH_t + a_{t+1} g_{t+1}
        prev = torch.cat([(h0 if h0 is not None else torch.zeros_like(states[0]))[None], states[:-1]])
        da = g * prev
        dh0 = a[0] * g[0] if h0 is not None else None
        return da, g, dh0


def _torch_scan(x, dt, A, Bm, Cm, h0):  # x, dt [Bt, L, E]; A [E, N]; Bm, Cm [Bt, L, N]; h0 [Bt, E, N]
    dt_l = dt.transpose(0, 1)  # [L, Bt, E]
    a = torch.exp(dt_l[..., None] * A)  # [L, Bt, E, N]
    b = (dt_l * x.transpose(0, 1))[..., None] * Bm.transpose(0, 1)[:, :, None, :]  # [L, Bt, E, N]
    states = _LinearRecurrence.apply(a, b, h0)  # [L, Bt, E, N]
    return torch.einsum("lben,bln->ble", states, Cm)  # [Bt, L, E]


# --- the sequential reference --------------------------------------------------------------------------


def _reference_scan(x, dt, A, Bm, Cm, h0):  # shapes as in _torch_scan
    bt, length, e = x.shape
    h = h0 if h0 is not None else x.new_zeros(bt, e, A.shape[1])  # [Bt, E, N]
    ys = []
    for t in range(length):
        a_t = torch.exp(dt[:, t, :, None] * A)  # [Bt, E, N]
        h = a_t * h + (dt[:, t] * x[:, t])[..., None] * Bm[:, None, t, :]  # [Bt, E, N]
        ys.append((h * Cm[:, None, t, :]).sum(-1))  # [Bt, E]
    return torch.stack(ys, dim=1)  # [Bt, L, E]


# --- the entry point -------------------------------------------------------------------------------------


def resolve_impl(impl: Impl) -> Literal["compiled", "torch", "reference"]:
    if impl == "auto":
        return "compiled" if load_kernel() is not None else "torch"
    if impl == "compiled" and load_kernel() is None:
        raise RuntimeError(f"the compiled selective scan is unavailable: {kernel_error()}")
    return impl


def selective_scan_tokens(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                          delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                          initial_state: torch.Tensor | None = None, impl: Impl = "auto") -> torch.Tensor:
    """The selective scan in the token-major layout the mixer produces (no transposes).

    x, dt, z: [Bt, L, E]; A: [E, N]; B, C: [Bt, L, N]; D, delta_bias: [E]; initial_state: [Bt or 1, E, N].
    Returns y [Bt, L, E] in x's dtype. The scan runs in fp32 (SSM parameters stay fp32 under autocast), as
    mamba-ssm's kernels do.
    """
    dtype = x.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        bt, _, e = x.shape
        h0 = None if initial_state is None else initial_state.float().expand(bt, e, A.shape[1]).contiguous()
        which = resolve_impl(impl)
        if which == "compiled" and x.device.type == "cpu":
            def f32(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.float().contiguous()

            y = _CompiledScan.apply(f32(x), f32(dt), f32(A), f32(B), f32(C), f32(D), f32(z), f32(delta_bias),
                                    h0, delta_softplus)
            return y.to(dtype)
        xf, dtf = x.float(), dt.float()
        if delta_bias is not None:
            dtf = dtf + delta_bias.float()
        if delta_softplus:
            dtf = F.softplus(dtf)
        scan = _reference_scan if which == "reference" else _torch_scan
        y = scan(xf, dtf, A.float(), B.float(), C.float(), h0)  # [Bt, L, E]
        if D is not None:
            y = y + xf * D.float()
        if z is not None:
            y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                   initial_state: torch.Tensor | None = None, impl: Impl = "auto") -> torch.Tensor:
    """The same scan with mamba-ssm's channel-major layout: u, delta, z [Bt, E, L]; B, C [Bt, N, L];
    returns [Bt, E, L]."""
    y = selective_scan_tokens(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                              D=D, z=None if z is None else z.transpose(1, 2), delta_bias=delta_bias,
                              delta_softplus=delta_softplus, initial_state=initial_state, impl=impl)
    return y.transpose(1, 2)
