/* Fused selective scan (Mamba-1) for CPU, token-major, with the gate, skip and dt softplus fused in.
 *
 * Notation (trials/scan.py): Bt batch, L length, E channels, N state size, K = CHUNK.
 *   x, dt_raw, z, y, dx, ddt_raw, dz : [Bt, L, E]   (the layout in_proj and x_proj produce: no transposes)
 *   A [E, N]; D, dt_bias [E]; Bm, Cm, dB, dC [Bt, L, N]; h0, dh0 [Bt, E, N]
 *   Hc [Bt, ceil(L / K), E, N]: the state entering each chunk of K steps (all the backward keeps)
 *   dA_part [Bt, E, N], dD_part, dbias_part [Bt, E]: per-batch partial sums, reduced by the caller
 * dt_t = softplus(dt_raw_t + dt_bias)          (plain sum when softplus is 0)
 * h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t ;  s_t = <h_t, C_t> + D x_t ;  y_t = s_t silu(z_t)
 * Optional pointers (dt_bias, D, z, h0) may be NULL. One thread handles one batch element, so the sums over
 * channels (dB, dC) need no atomics; the backward recomputes each chunk's states from its checkpoint.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16

static inline float softplus_f(float v) { return v > 20.f ? v : log1pf(expf(v)); }
static inline float sigmoid_f(float v) { return 1.f / (1.f + expf(-v)); }

int scan_chunk(void) { return CHUNK; }

void scan_forward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *Bm,
                  const float *Cm, const float *D, const float *z, const float *h0, float *y, float *Hc,
                  int softplus, int64_t Bt, int64_t L, int64_t E, int64_t N, int nthreads) {
    const int64_t n_chunks = (L + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        float *h = malloc(E * N * sizeof(float));
        if (h0) memcpy(h, h0 + b * E * N, E * N * sizeof(float));
        else memset(h, 0, E * N * sizeof(float));
        for (int64_t t = 0; t < L; t++) {
            if (t % CHUNK == 0) memcpy(Hc + (b * n_chunks + t / CHUNK) * E * N, h, E * N * sizeof(float));
            const int64_t bt = b * L + t;
            const float *B_t = Bm + bt * N, *C_t = Cm + bt * N;
            for (int64_t e = 0; e < E; e++) {
                const float raw = dt_raw[bt * E + e] + (dt_bias ? dt_bias[e] : 0.f);
                const float dt = softplus ? softplus_f(raw) : raw, xv = x[bt * E + e], dxv = dt * xv;
                const float *a_row = A + e * N;
                float *h_e = h + e * N, acc = 0.f;
                for (int64_t n = 0; n < N; n++) {
                    h_e[n] = expf(dt * a_row[n]) * h_e[n] + dxv * B_t[n];
                    acc += h_e[n] * C_t[n];
                }
                if (D) acc += D[e] * xv;
                if (z) { const float zv = z[bt * E + e]; acc *= zv * sigmoid_f(zv); }
                y[bt * E + e] = acc;
            }
        }
        free(h);
    }
}

void scan_backward(const float *x, const float *dt_raw, const float *dt_bias, const float *A, const float *Bm,
                   const float *Cm, const float *D, const float *z, const float *Hc, const float *dy,
                   float *dx, float *ddt_raw, float *dz, float *dA_part, float *dB, float *dC, float *dD_part,
                   float *dbias_part, float *dh0, int softplus, int64_t Bt, int64_t L, int64_t E, int64_t N,
                   int nthreads) {
    const int64_t n_chunks = (L + CHUNK - 1) / CHUNK, EN = E * N;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        float *g = calloc(EN, sizeof(float));             /* dLoss/dh flowing back from later steps */
        float *dA_acc = calloc(EN, sizeof(float));
        float *hs = malloc((CHUNK + 1) * EN * sizeof(float)); /* hs[k]: state before step k of the chunk */
        float *as = malloc(CHUNK * EN * sizeof(float));       /* decays exp(dt A) */
        float *ss = malloc(CHUNK * E * sizeof(float));        /* s_t before the gate */
        float *dD_acc = dD_part + b * E, *dbias_acc = dbias_part + b * E;
        memset(dD_acc, 0, E * sizeof(float));
        memset(dbias_acc, 0, E * sizeof(float));
        for (int64_t c = n_chunks - 1; c >= 0; c--) {
            const int64_t t0 = c * CHUNK, t1 = t0 + CHUNK < L ? t0 + CHUNK : L;
            memcpy(hs, Hc + (b * n_chunks + c) * EN, EN * sizeof(float));
            for (int64_t t = t0; t < t1; t++) {
                const int64_t k = t - t0, bt = b * L + t;
                const float *B_t = Bm + bt * N, *C_t = Cm + bt * N;
                for (int64_t e = 0; e < E; e++) {
                    const float raw = dt_raw[bt * E + e] + (dt_bias ? dt_bias[e] : 0.f);
                    const float dt = softplus ? softplus_f(raw) : raw, xv = x[bt * E + e], dxv = dt * xv;
                    const float *a_row = A + e * N, *hp = hs + k * EN + e * N;
                    float *hn = hs + (k + 1) * EN + e * N, *an = as + k * EN + e * N, acc = 0.f;
                    for (int64_t n = 0; n < N; n++) {
                        an[n] = expf(dt * a_row[n]);
                        hn[n] = an[n] * hp[n] + dxv * B_t[n];
                        acc += hn[n] * C_t[n];
                    }
                    ss[k * E + e] = acc + (D ? D[e] * xv : 0.f);
                }
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {
                const int64_t k = t - t0, bt = b * L + t;
                const float *B_t = Bm + bt * N, *C_t = Cm + bt * N;
                float *dB_t = dB + bt * N, *dC_t = dC + bt * N;
                for (int64_t e = 0; e < E; e++) {
                    const int64_t i = bt * E + e;
                    const float raw = dt_raw[i] + (dt_bias ? dt_bias[e] : 0.f);
                    const float dt = softplus ? softplus_f(raw) : raw, xv = x[i], dxv = dt * xv;
                    float gs = dy[i];                          /* dLoss/ds_t */
                    if (z) {
                        const float zv = z[i], sg = sigmoid_f(zv);
                        dz[i] = dy[i] * ss[k * E + e] * sg * (1.f + zv * (1.f - sg));
                        gs = dy[i] * zv * sg;
                    }
                    float dxd = 0.f;
                    if (D) { dD_acc[e] += gs * xv; dxd = gs * D[e]; }
                    const float *a_row = A + e * N, *hp = hs + k * EN + e * N, *hn = hs + (k + 1) * EN + e * N;
                    const float *an = as + k * EN + e * N;
                    float *g_e = g + e * N, *dA_e = dA_acc + e * N, ddt = 0.f, ddx = 0.f;
                    for (int64_t n = 0; n < N; n++) {
                        const float gn = g_e[n] + gs * C_t[n];   /* dLoss/dh_t */
                        const float da = gn * hp[n] * an[n];      /* through exp(dt A) */
                        dC_t[n] += gs * hn[n];
                        ddt += da * a_row[n];
                        dA_e[n] += da * dt;
                        ddx += gn * B_t[n];
                        dB_t[n] += gn * dxv;
                        g_e[n] = gn * an[n];
                    }
                    const float ddt_total = ddt + ddx * xv;
                    const float draw = softplus ? ddt_total * sigmoid_f(raw) : ddt_total;
                    ddt_raw[i] = draw;
                    dbias_acc[e] += draw;
                    dx[i] = ddx * dt + dxd;
                }
            }
        }
        memcpy(dh0 + b * EN, g, EN * sizeof(float));
        memcpy(dA_part + b * EN, dA_acc, EN * sizeof(float));
        free(g); free(dA_acc); free(hs); free(as); free(ss);
    }
}

/* Causal depthwise convolution + SiLU, token-major (what nn.Conv1d(E, E, K, groups=E, padding=K - 1) does
 * on the first L outputs, then the activation), reading x straight out of in_proj's [Bt, L, 2E] output.
 *   x: [Bt, L, *] with row stride `stride` (elements between consecutive tokens); w [E, K]; bias [E] or NULL
 *   out, dout, dx: [Bt, L, E];  dw_part [Bt, E, K], dbias_part [Bt, E]: per-batch partial sums
 * pre_t = bias + sum_k w[k] x_{t-K+1+k} ;  out_t = silu(pre_t) when act, else pre_t.
 */
/* pre[e] = bias[e] + sum_k w[e, k] x[b, t - K + 1 + k, e] (zero before the sequence starts) */
static inline void conv_pre(const float *x, int64_t stride, const float *w, const float *bias, int64_t b,
                            int64_t t, int64_t L, int64_t E, int64_t K, float *pre) {
    for (int64_t e = 0; e < E; e++) pre[e] = bias ? bias[e] : 0.f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t s = t - K + 1 + k;
        if (s < 0) continue;
        const float *xs = x + (b * L + s) * stride;
        for (int64_t e = 0; e < E; e++) pre[e] += w[e * K + k] * xs[e];
    }
}

void conv_forward(const float *x, int64_t stride, const float *w, const float *bias, float *out, int act,
                  int64_t Bt, int64_t L, int64_t E, int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        for (int64_t t = 0; t < L; t++) {
            float *o = out + (b * L + t) * E;
            conv_pre(x, stride, w, bias, b, t, L, E, K, o);
            if (act)
                for (int64_t e = 0; e < E; e++) o[e] = o[e] / (1.f + expf(-o[e]));
        }
    }
}

void conv_backward(const float *x, int64_t stride, const float *w, const float *bias, const float *dout,
                   float *dx, float *dw_part, float *dbias_part, int act, int64_t Bt, int64_t L, int64_t E,
                   int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        float *dpre = malloc(L * E * sizeof(float)); /* dLoss/dpre for this batch row */
        float *dw = dw_part + b * E * K, *db = dbias_part + b * E;
        memset(dw, 0, E * K * sizeof(float));
        memset(db, 0, E * sizeof(float));
        for (int64_t t = 0; t < L; t++) {
            float *dp = dpre + t * E;
            const float *go = dout + (b * L + t) * E;
            if (act) {
                conv_pre(x, stride, w, bias, b, t, L, E, K, dp); /* recompute the pre-activation */
                for (int64_t e = 0; e < E; e++) {
                    const float sg = 1.f / (1.f + expf(-dp[e]));
                    dp[e] = go[e] * sg * (1.f + dp[e] * (1.f - sg));
                }
            } else {
                memcpy(dp, go, E * sizeof(float));
            }
            for (int64_t e = 0; e < E; e++) db[e] += dp[e];
            for (int64_t k = 0; k < K; k++) {
                const int64_t s = t - K + 1 + k;
                if (s < 0) continue;
                const float *xs = x + (b * L + s) * stride;
                for (int64_t e = 0; e < E; e++) dw[e * K + k] += dp[e] * xs[e];
            }
        }
        for (int64_t s = 0; s < L; s++) {
            float *d = dx + (b * L + s) * E;
            memset(d, 0, E * sizeof(float));
            for (int64_t k = 0; k < K; k++) {
                const int64_t t = s + K - 1 - k;
                if (t >= L) continue;
                const float *dp = dpre + t * E;
                for (int64_t e = 0; e < E; e++) d[e] += w[e * K + k] * dp[e];
            }
        }
        free(dpre);
    }
}
