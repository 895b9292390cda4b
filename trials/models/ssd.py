"""The Mamba-2 scan on CPU: chunked state-space duality (SSD; Dao & Gu 2024, "Transformers are SSMs", Sec. 6).

Notation, used on every tensor line below: Bt batch, L length, H heads, P head dim, G groups (B and C are shared
by the R = H / G heads of a group), N state size, Q chunk length, T = ceil(L / Q) chunks.

The recurrence, per head h (its group g = h // R), with dt already discretised (softplus(dt + dt_bias), clamped):
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: [P, N]
    y_t = S_t C_t + D_h x_t
Within a chunk it is computed in its quadratic ("attention") form, across chunks as a recurrence over the chunk
states; the two are the same sum, split at chunk boundaries, so the result does not depend on Q (only the rounding
does). Q is chosen for speed on CPU, not taken from the model's config.

Speed on CPU comes from the layout, not from the algorithm alone: everything is kept group-major
([Bt, T, G, Q, R*P]) so each contraction is one plain batched matmul, and the within-chunk decay
exp(a_l - a_s) is factored as exp(a_l - m) exp(m - a_s) (m the chunk's mid log-decay) so it scales the inputs and
outputs of the matmul instead of building a [Bt, T, H, Q, Q] decay tensor. The factored form is exact in real
arithmetic; in fp32 it is safe while a chunk's total log-decay stays within ``FACTORED_SPAN`` (each factor then
stays within exp(+-FACTORED_SPAN / 2)); beyond that the scan builds the masked decay tensor instead (``stable``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTORED_SPAN = 80.0  # exp(40) ~ 2e17: the largest factor times any sane activation stays far below fp32's max


def chunk_size_for(length: int, groups: int) -> int:
    """The chunk length measured fastest on CPU (benchmarks.scan, Mamba-2 section): the within-chunk matmuls cost
    about G Q^2 per chunk, the across-chunk part about T, so many groups favour short chunks."""
    return 16 if groups >= 4 else 64


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor,
                  limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """softplus(dt + dt_bias) clamped to ``limit``, in fp32, as transformers' Mamba-2 torch path and mamba-ssm's
    kernels do. dt: [Bt, L, H]; dt_bias: [H]."""
    dt = F.softplus(dt.float() + dt_bias.float())  # [Bt, L, H]
    if tuple(limit) != (0.0, float("inf")):
        dt = dt.clamp(min=limit[0], max=limit[1])  # [Bt, L, H]
    return dt


def _pad_time(v: torch.Tensor, pad: int) -> torch.Tensor:
    """v [Bt, L, ...] with ``pad`` zero steps appended (no copy when there are none)."""
    return F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) if pad else v


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
             chunk_size: int | None = None, factored: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 selective scan, chunked.

    x: [Bt, L, H, P]; dt: [Bt, L, H] (discretised, see ``discretize_dt``); A: [H] (negative); B, C: [Bt, L, G, N];
    D: [H]; initial_state: [Bt or 1, H, P, N], the state before the first token (zero when None).
    Returns y [Bt, L, H, P] and the state after the last token [Bt, H, P, N], both fp32: computed in fp32 with
    autocast off, as mamba-ssm's kernels do. ``chunk_size`` defaults to ``chunk_size_for``; ``factored`` (default:
    when every chunk's log-decay is within ``FACTORED_SPAN``) picks the within-chunk form.
    """
    bt, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g or B.shape != C.shape or B.shape[:2] != (bt, length) or dt.shape != (bt, length, h) \
            or A.shape != (h,):
        raise ValueError(f"ssd_scan: shapes do not agree: x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} (heads must split into "
                         "the groups of B and C)")
    r = h // g
    q = max(1, min(chunk_size or chunk_size_for(length, g), length))
    t = -(-length // q)
    pad = t * q - length
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Padded steps have dt = 0: they neither decay the state nor add to it, so the final state is the last
        # real step's.
        xg = _pad_time(x.float(), pad).view(bt, t, q, g, r, p).transpose(2, 3)  # [Bt, T, G, Q, R, P]
        dtg = _pad_time(dt.float(), pad).view(bt, t, q, g, r).transpose(2, 3)  # [Bt, T, G, Q, R]
        Bg = _pad_time(B.float(), pad).view(bt, t, q, g, n).transpose(2, 3)  # [Bt, T, G, Q, N]
        Cg = _pad_time(C.float(), pad).view(bt, t, q, g, n).transpose(2, 3).contiguous()  # [Bt, T, G, Q, N]
        acum = (dtg * A.float().view(g, 1, r)).cumsum(dim=3)  # [Bt, T, G, Q, R], log-decay from chunk start
        last = acum[:, :, :, -1:]  # [Bt, T, G, 1, R], each chunk's total log-decay
        if factored is None:
            factored = bool(-last.detach().min() <= FACTORED_SPAN) if last.numel() else True
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()  # [Q(l), Q(s)]
        cb = (Cg @ Bg.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [Bt, T, G, Q, Q], shared by a group's heads

        # 1. Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(acum_l - acum_s) dt_s x_s; and each chunk's
        #    own contribution to the state at its end, sum_s exp(last - acum_s) dt_s x_s B_s^T.
        if factored:
            mid = last * 0.5  # [Bt, T, G, 1, R]
            xs = (xg * (dtg * (mid - acum).exp())[..., None]).contiguous()  # [Bt, T, G, Q, R, P]
            xs = xs.view(bt, t, g, q, r * p)  # [Bt, T, G, Q, R*P]
            own = (Bg.transpose(-1, -2) @ xs).view(bt, t, g, n, r, p)  # [Bt, T, G, N, R, P]
            own = own * (last - mid).exp().view(bt, t, g, 1, r, 1)  # [Bt, T, G, N, R, P]
        else:
            ah = acum.transpose(3, 4)  # [Bt, T, G, R, Q]
            decay = (ah[..., :, None] - ah[..., None, :]).masked_fill(~causal, float("-inf")).exp()
            # decay: [Bt, T, G, R, Q, Q]; masked before exp, so no inf * 0
            xdt = (xg * dtg[..., None]).transpose(3, 4)  # [Bt, T, G, R, Q, P]
            y_in = ((cb[:, :, :, None] * decay) @ xdt).transpose(3, 4)  # [Bt, T, G, Q, R, P]
            xe = (xdt * (last.transpose(3, 4) - ah).exp()[..., None]).transpose(3, 4)  # [Bt, T, G, Q, R, P]
            own = (Bg.transpose(-1, -2) @ xe.reshape(bt, t, g, q, r * p)).view(bt, t, g, n, r, p)
            # own: [Bt, T, G, N, R, P]

        # 2. Across chunks: the state entering chunk k is sum_{j <= k} exp(cs_k - cs_j) S'_j, with S'_0 the initial
        #    state and S'_j (j >= 1) chunk j-1's own contribution; k = T gives the final state. States are kept
        #    as [G, N, R, P] (transposed) so that C reads them out with one matmul.
        if initial_state is not None:
            h0 = initial_state.float().expand(bt, h, p, n).view(bt, g, r, p, n).permute(0, 1, 4, 2, 3)
        else:
            h0 = xg.new_zeros(bt, g, n, r, p)
        # h0: [Bt, G, N, R, P]
        sources = torch.cat([h0[:, None], own], dim=1)  # [Bt, T+1, G, N, R, P]
        cs = F.pad(last[:, :, :, 0].cumsum(dim=1), (0, 0, 0, 0, 1, 0))  # [Bt, T+1, G, R], log-decay to chunk k
        causal_t = torch.ones(t + 1, t + 1, dtype=torch.bool, device=x.device).tril()[..., None, None]
        weights = (cs[:, :, None] - cs[:, None]).masked_fill(~causal_t, float("-inf")).exp()
        # weights: [Bt, T+1(k), T+1(j), G, R]
        starts = torch.einsum("bkjgr,bjgnrp->bkgnrp", weights, sources)  # [Bt, T+1, G, N, R, P]
        final = starts[:, -1].permute(0, 1, 3, 4, 2).reshape(bt, h, p, n)  # [Bt, H, P, N]

        # 3. The state entering each chunk, read out by C and decayed to each position: exp(acum_l) S C_l. In the
        #    factored form exp(acum_l) = exp(acum_l - mid) exp(mid), so one matmul-add and one scaling give both
        #    terms.
        entering = starts[:, :-1]  # [Bt, T, G, N, R, P]
        if factored:
            entering = entering * mid.exp().view(bt, t, g, 1, r, 1)  # [Bt, T, G, N, R, P]
            y = torch.baddbmm((Cg @ entering.reshape(bt, t, g, n, r * p)).view(-1, q, r * p),
                              cb.view(-1, q, q), xs.view(-1, q, r * p))  # [Bt*T*G, Q, R*P]
            y = y.view(bt, t, g, q, r, p) * (acum - mid).exp()[..., None]  # [Bt, T, G, Q, R, P]
        else:
            y_off = (Cg @ entering.reshape(bt, t, g, n, r * p)).view(bt, t, g, q, r, p)  # [Bt, T, G, Q, R, P]
            y = y_in + y_off * acum.exp()[..., None]  # [Bt, T, G, Q, R, P]
        y = y.transpose(2, 3).reshape(bt, t * q, h * p)[:, :length]  # [Bt, L, H*P]
        if D is not None:  # broadcast over a last dim of H*P, not P: CPU kernels vectorise the last dim only
            y = y + x.float().reshape(bt, length, h * p) * D.float().repeat_interleave(p)  # [Bt, L, H*P]
        y = y.view(bt, length, h, p)  # [Bt, L, H, P]
    return y, final


def reference_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None,
                   initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan as a plain loop over time (shapes as in ``ssd_scan``): the ground truth for tests, never
    fast."""
    bt, length, h, p = x.shape
    r = h // B.shape[2]
    Bh = B.float().repeat_interleave(r, dim=2)  # [Bt, L, H, N]
    Ch = C.float().repeat_interleave(r, dim=2)  # [Bt, L, H, N]
    state = (initial_state.float().expand(bt, h, p, B.shape[3]) if initial_state is not None
             else x.new_zeros(bt, h, p, B.shape[3], dtype=torch.float32))  # [Bt, H, P, N]
    ys = []
    for i in range(length):
        decay = torch.exp(dt[:, i].float() * A.float())[..., None, None]  # [Bt, H, 1, 1]
        inp = (dt[:, i, :, None].float() * x[:, i].float())[..., None] * Bh[:, i, :, None, :]  # [Bt, H, P, N]
        state = decay * state + inp  # [Bt, H, P, N]
        ys.append((state * Ch[:, i, :, None, :]).sum(-1))  # [Bt, H, P]
    y = torch.stack(ys, dim=1)  # [Bt, L, H, P]
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y, state
