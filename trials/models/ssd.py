"""The Mamba-2 scan on CPU: chunked state-space duality (SSD; Dao & Gu 2024, "Transformers are SSMs", Sec. 6).

Notation, used on every tensor line below: Bt batch, L length, H heads, P head dim, G groups (B and C are shared
by the R = H / G heads of a group), N state size, Q chunk length, T = ceil(L / Q) chunks.

The recurrence, per head h (its group g = h // R), with dt already discretised (softplus(dt + dt_bias), clamped):
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: [P, N]
    y_t = S_t C_t + D_h x_t
Within a chunk it is computed in its quadratic ("attention") form, across chunks as a recurrence over the chunk
states; the two are the same sum, split at chunk boundaries, so the result does not depend on Q (only the rounding
does). Q is chosen for speed on CPU, not taken from the model's config.

Speed on CPU comes from the layout, not from the algorithm alone: everything is kept group-major and
position-inner ([Bt, T, G, R*P, Q]) so each contraction is one plain batched matmul and each per-position
scaling vectorises over positions, and the within-chunk decay
exp(a_l - a_s) is factored as exp(a_l - m) exp(m - a_s) (m the chunk's mid log-decay) so it scales the inputs and
outputs of the matmul instead of building a [Bt, T, H, Q, Q] decay tensor. The factored form is exact in real
arithmetic; in fp32 it is safe while a chunk's total log-decay stays within ``FACTORED_SPAN`` (each factor then
stays within exp(+-FACTORED_SPAN / 2)); beyond that the scan builds the masked decay tensor instead
(``factored=False``, about 1.5x slower). A sequential scan, the project's compiled Mamba-1 kernel
(trials.models.scan) over H*P channels, was measured too: it only fits one group (it shares B and C across channels) and
was slower than this at L = 256 on the tiny model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTORED_SPAN = 80.0  # exp(40) ~ 2e17: the largest factor times any sane activation stays far below fp32's max


def chunk_size_for(length: int, groups: int) -> int:
    """The chunk length measured fastest on CPU for the tiny models (fwd+bwd, 2 and 8 groups, L = 64 and 256;
    16 beat 8, 32 and 64): the within-chunk matmuls cost about Q^2 per chunk, the across-chunk part grows with T
    and every chunk adds a small matmul's overhead. Kept a function of the shape so a measured rule can replace
    it."""
    return 16


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
    autocast off, as mamba-ssm's kernels do. ``chunk_size`` defaults to ``chunk_size_for``; ``factored`` (default on the
    CPU: when every chunk's log-decay is within ``FACTORED_SPAN``; elsewhere False, to keep the device unread) picks
    the within-chunk form.
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
        # real step's. Position-inner layout: per-position scalings broadcast over P (outer), so the elementwise
        # kernels vectorise over Q positions rather than over P = 8 channels.
        xT = _pad_time(x.float(), pad).view(bt, t, q, g, r, p).permute(0, 1, 3, 4, 5, 2)  # [Bt, T, G, R, P, Q]
        dtT = _pad_time(dt.float(), pad).view(bt, t, q, g, r).permute(0, 1, 3, 4, 2)  # [Bt, T, G, R, Q]
        Bg = _pad_time(B.float(), pad).view(bt, t, q, g, n).transpose(2, 3)  # [Bt, T, G, Q, N]
        Cg = _pad_time(C.float(), pad).view(bt, t, q, g, n).transpose(2, 3)  # [Bt, T, G, Q, N]
        acum = (dtT * A.float().view(g, r, 1)).cumsum(dim=-1)  # [Bt, T, G, R, Q], log-decay from chunk start
        last = acum[..., -1:]  # [Bt, T, G, R, 1], each chunk's total log-decay
        if factored is None and x.device.type != "cpu":
            # Deciding from the data would read the device once per layer and forward; on an accelerator (where this
            # path is the fallback from mamba-ssm's kernel) the masked form, safe at any decay, runs without that.
            factored = False
        if factored is None:
            factored = bool(-last.detach().min() <= FACTORED_SPAN) if last.numel() else True
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).triu()  # [Q(s), Q(l)]: s <= l
        cbT = (Bg @ Cg.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [Bt, T, G, Q(s), Q(l)], shared by R heads

        # 1. Within each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(acum_l - acum_s) dt_s x_s; and each chunk's
        #    own contribution to the state at its end, sum_s exp(last - acum_s) dt_s x_s B_s^T.
        if factored:
            mid = last * 0.5  # [Bt, T, G, R, 1]
            xs = (xT * (dtT * (mid - acum).exp())[..., None, :]).contiguous()  # [Bt, T, G, R, P, Q]
            xs = xs.view(bt, t, g, r * p, q)  # [Bt, T, G, R*P, Q]
            own = (xs @ Bg).view(bt, t, g, r, p, n) * (last - mid).exp()[..., None]  # [Bt, T, G, R, P, N]
        else:
            decay = (acum[..., None, :] - acum[..., :, None]).masked_fill(~causal, float("-inf")).exp()
            # decay: [Bt, T, G, R, Q(s), Q(l)]; masked before exp, so no inf * 0
            xdt = xT * dtT[..., None, :]  # [Bt, T, G, R, P, Q]
            y_in = xdt @ (cbT[:, :, :, None] * decay)  # [Bt, T, G, R, P, Q]
            own = (xdt * (last - acum).exp()[..., None, :]) @ Bg[:, :, :, None]  # [Bt, T, G, R, P, N]

        # 2. Across chunks: the state entering chunk k is sum_{j <= k} exp(cs_k - cs_j) S'_j, with S'_0 the initial
        #    state and S'_j (j >= 1) chunk j-1's own contribution; k = T gives the final state.
        cs = F.pad(last[..., 0].cumsum(dim=1), (0, 0, 0, 0, 1, 0))  # [Bt, T+1, G, R], log-decay to chunk k
        causal_t = torch.ones(t + 1, t + 1, dtype=torch.bool, device=x.device).tril()[..., None, None]
        weights = (cs[:, :, None] - cs[:, None]).masked_fill(~causal_t, float("-inf")).exp()
        # weights: [Bt, T+1(k), T+1(j), G, R]
        starts = torch.einsum("bkjgr,bjgrpn->bkgrpn", weights[:, :, 1:], own)  # [Bt, T+1, G, R, P, N]
        if initial_state is not None:  # S'_0, kept out of the einsum so the common zero state costs nothing
            h0 = initial_state.float().expand(bt, h, p, n).reshape(bt, 1, g, r, p, n)  # [Bt, 1, G, R, P, N]
            starts = starts + weights[:, :, 0, :, :, None, None] * h0  # [Bt, T+1, G, R, P, N]
        final = starts[:, -1].reshape(bt, h, p, n)  # [Bt, H, P, N]

        # 3. The state entering each chunk, read out by C and decayed to each position: exp(acum_l) S C_l. In the
        #    factored form exp(acum_l) = exp(acum_l - mid) exp(mid), so one matmul-add and one scaling give both
        #    terms.
        entering = starts[:, :-1]  # [Bt, T, G, R, P, N]
        CgT = Cg.transpose(-1, -2)  # [Bt, T, G, N, Q]
        if factored:
            entering = (entering * mid.exp()[..., None]).reshape(bt, t, g, r * p, n)  # [Bt, T, G, R*P, N]
            y = torch.baddbmm((entering @ CgT).view(-1, r * p, q), xs.view(-1, r * p, q),
                              cbT.reshape(-1, q, q))  # [Bt*T*G, R*P, Q]
            y = y.view(bt, t, g, r, p, q) * (acum - mid).exp()[..., None, :]  # [Bt, T, G, R, P, Q]
        else:
            y_off = entering @ CgT[:, :, :, None]  # [Bt, T, G, R, P, Q]
            y = y_in + y_off * acum.exp()[..., None, :]  # [Bt, T, G, R, P, Q]
        y = y.permute(0, 1, 5, 2, 3, 4).reshape(bt, t * q, h * p)[:, :length]  # [Bt, L, H*P]
        if D is not None:  # broadcast over a last dim of H*P, not P: CPU kernels vectorise the last dim only
            y = torch.addcmul(y, x.float().reshape(bt, length, h * p), D.float().repeat_interleave(p))  # [Bt, L, H*P]
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
