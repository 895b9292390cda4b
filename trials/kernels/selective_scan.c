/* Fused selective scan (Mamba-1) for CPU: forward and backward over one (batch, channel) row at a time.
 *
 * Notation (trials/scan.py): Bt = batch, E = channels, L = length, N = state size, K = CHUNK.
 *   u, delta, y, du, ddelta : [Bt, E, L]   (delta already softplus'ed and biased)
 *   A                        : [E, N];  dA_part [Bt, E, N] (summed over the batch by the caller)
 *   Bm, Cm, dB, dC           : [Bt, L, N]   (time-major inside a batch row, so the n loop is contiguous)
 *   Hc                       : [Bt, E, ceil(L / K), N]  the state entering each chunk of K steps
 *   h0, dh0                  : [Bt, E, N] initial state (h0 may be NULL)
 * h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t ;  y_t = <h_t, C_t>
 * Only one state per chunk is kept; the backward recomputes a chunk's states (and decays) into a small
 * buffer before walking it in reverse, so memory and memory traffic stay a K-th of storing every state.
 * Rows of one batch element are handled by one thread, so dB and dC need no atomics.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 16

void scan_forward(const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                  const float *h0, float *y, float *Hc, int64_t Bt, int64_t E, int64_t L, int64_t N,
                  int nthreads) {
    const int64_t n_chunks = (L + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        float h[N];
        for (int64_t e = 0; e < E; e++) {
            const int64_t row = b * E + e;
            const float *a_row = A + e * N, *u_row = u + row * L, *d_row = delta + row * L;
            float *y_row = y + row * L, *Hc_row = Hc + row * n_chunks * N;
            if (h0) memcpy(h, h0 + row * N, N * sizeof(float));
            else memset(h, 0, N * sizeof(float));
            for (int64_t t = 0; t < L; t++) {
                if (t % CHUNK == 0) memcpy(Hc_row + (t / CHUNK) * N, h, N * sizeof(float));
                const float dt = d_row[t], dx = dt * u_row[t];
                const float *B_t = Bm + (b * L + t) * N, *C_t = Cm + (b * L + t) * N;
                float acc = 0.f;
                for (int64_t n = 0; n < N; n++) {
                    h[n] = expf(dt * a_row[n]) * h[n] + dx * B_t[n];
                    acc += h[n] * C_t[n];
                }
                y_row[t] = acc;
            }
        }
    }
}

void scan_backward(const float *u, const float *delta, const float *A, const float *Bm, const float *Cm,
                   const float *Hc, const float *dy, float *du, float *ddelta, float *dA_part, float *dB,
                   float *dC, float *dh0, int64_t Bt, int64_t E, int64_t L, int64_t N, int nthreads) {
    const int64_t n_chunks = (L + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < Bt; b++) {
        float g[N], dA_acc[N];
        float hs[(CHUNK + 1) * N], as[CHUNK * N]; /* states entering and leaving each step; decays */
        for (int64_t e = 0; e < E; e++) {
            const int64_t row = b * E + e;
            const float *a_row = A + e * N, *u_row = u + row * L, *d_row = delta + row * L;
            const float *dy_row = dy + row * L, *Hc_row = Hc + row * n_chunks * N;
            memset(g, 0, N * sizeof(float));
            memset(dA_acc, 0, N * sizeof(float));
            for (int64_t c = n_chunks - 1; c >= 0; c--) {
                const int64_t t0 = c * CHUNK, t1 = t0 + CHUNK < L ? t0 + CHUNK : L;
                /* recompute: hs[k] is the state before step t0 + k, hs[k + 1] after it */
                memcpy(hs, Hc_row + c * N, N * sizeof(float));
                for (int64_t t = t0; t < t1; t++) {
                    const int64_t k = t - t0;
                    const float dt = d_row[t], dx = dt * u_row[t];
                    const float *B_t = Bm + (b * L + t) * N;
                    for (int64_t n = 0; n < N; n++) {
                        const float a = expf(dt * a_row[n]);
                        as[k * N + n] = a;
                        hs[(k + 1) * N + n] = a * hs[k * N + n] + dx * B_t[n];
                    }
                }
                for (int64_t t = t1 - 1; t >= t0; t--) {
                    const int64_t k = t - t0;
                    const float dt = d_row[t], x = u_row[t], dx = dt * x, gy = dy_row[t];
                    const float *B_t = Bm + (b * L + t) * N, *C_t = Cm + (b * L + t) * N;
                    float *dB_t = dB + (b * L + t) * N, *dC_t = dC + (b * L + t) * N;
                    const float *h_prev = hs + k * N, *h_t = hs + (k + 1) * N, *a_t = as + k * N;
                    float ddt = 0.f, ddx = 0.f;
                    for (int64_t n = 0; n < N; n++) {
                        const float gn = g[n] + gy * C_t[n];  /* dLoss/dh_t */
                        const float da = gn * h_prev[n] * a_t[n]; /* through a_t = exp(dt A) */
                        dC_t[n] += gy * h_t[n];
                        ddt += da * a_row[n];
                        dA_acc[n] += da * dt;
                        ddx += gn * B_t[n];
                        dB_t[n] += gn * dx;
                        g[n] = gn * a_t[n];                   /* to h_{t-1} */
                    }
                    ddelta[row * L + t] = ddt + ddx * x;
                    du[row * L + t] = ddx * dt;
                }
            }
            memcpy(dh0 + row * N, g, N * sizeof(float));
            memcpy(dA_part + row * N, dA_acc, N * sizeof(float));
        }
    }
}

int scan_chunk(void) { return CHUNK; }
