/* Compiled backward sweeps of occore (loaded with ctypes by occore/lq/csweep.py; no Python C-API).
 *
 * occ_riccati_sweep is a line-by-line port of the numpy reference occore.lq.riccati.riccati_sweep
 * (state-form regularisation, optional second-order contraction, projected-Newton box QP of
 * occore.lq.box_qp.box_qp); occ_adjoint_sweep ports occore.lq.adjoint.adjoint_sweep, occ_gap_terms
 * occore.local_model.gap_terms (the expected change of a multiple-shooting step), occ_linear_states
 * occore.local_model.linear_states (the step of the linear model, FDDP rollout="linear"). All are
 * generic in nx and nu and use explicit loops: the matrices are tiny (nx, nu <= ~10), where loops
 * beat BLAS calls by far.
 *
 * Layout: every array is C-contiguous float64, time-major, with the shapes of DenseDerivatives:
 *   fx (T,nx,nx)  fu (T,nx,nu)  lx (T+1,nx)  lu (T,nu)  lxx (T+1,nx,nx)  lux (T,nu,nx)  luu (T,nu,nu)
 *   fxx (T,nx,nx,nx)  fux (T,nx,nu,nx)  fuu (T,nx,nu,nu)   (NULL when not second order)
 *   us, lower, upper, k_warm (T,nu)                         (NULL when absent)
 *   gaps (T,nx): dynamics defects of multiple shooting       (NULL when absent: zeros)
 * Outputs: k (T,nu), K (T,nu,nx), Vx (T+1,nx), Vxx (T+1,nx,nx), dd[2] = {d1, d2}.
 * Return value: -1 on success, -2 when out of memory, else the stage whose Cholesky failed.
 *
 * Cholesky failure follows LAPACK/OpenBLAS potrf as numpy calls it: a pivot <= 0 fails (a NaN pivot
 * does not, its NaNs propagate into the gains, as in the reference).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Share of the control-space term in the state-form regularisation (see riccati.py). */
#define CONTROL_REG 1e-6

#if defined(_WIN32)
#define OCC_EXPORT __declspec(dllexport)
#else
#define OCC_EXPORT __attribute__((visibility("default")))
#endif

/* In-place lower Cholesky of the n x n row-major matrix A (upper part left untouched, then zeroed).
 * Returns 0 on success, 1 when a pivot is <= 0. */
static int chol(double *A, int n) {
    for (int j = 0; j < n; ++j) {
        double ajj = A[j * n + j];
        for (int p = 0; p < j; ++p) ajj -= A[j * n + p] * A[j * n + p];
        if (ajj <= 0.0) return 1;
        ajj = sqrt(ajj);
        A[j * n + j] = ajj;
        for (int i = j + 1; i < n; ++i) {
            double s = A[i * n + j];
            for (int p = 0; p < j; ++p) s -= A[i * n + p] * A[j * n + p];
            A[i * n + j] = s / ajj;
        }
        for (int i = 0; i < j; ++i) A[i * n + j] = 0.0;
    }
    return 0;
}

/* Solves L L' x = b in place (L lower, n x n row-major). */
static void chol_solve(const double *L, int n, double *b) {
    for (int i = 0; i < n; ++i) {
        double s = b[i];
        for (int p = 0; p < i; ++p) s -= L[i * n + p] * b[p];
        b[i] = s / L[i * n + i];
    }
    for (int i = n - 1; i >= 0; --i) {
        double s = b[i];
        for (int p = i + 1; p < n; ++p) s -= L[p * n + i] * b[p];
        b[i] = s / L[i * n + i];
    }
}

/* 1/2 v'Hv + g'v */
static double qp_value(const double *H, const double *g, const double *v, int n) {
    double quad = 0.0, lin = 0.0;
    for (int i = 0; i < n; ++i) {
        double s = 0.0;
        for (int j = 0; j < n; ++j) s += v[j] * H[j * n + i];
        quad += s * v[i];
        lin += g[i] * v[i];
    }
    return 0.5 * quad + lin;
}

/* np.minimum(np.maximum(v, lo), hi) for non-NaN bounds: a NaN v stays NaN, as in numpy. */
static inline double clamp(double v, double lo, double hi) {
    if (v < lo) v = lo;
    if (v > hi) v = hi;
    return v;
}

static inline double max1(double a) { return a > 1.0 ? a : 1.0; } /* Python's max(1.0, a) */

/* Free set of the box QP at k: free[i] = !((k<=lo & grad>0) | (k>=hi & grad<0)); returns its size
 * and the free indices in idx. */
static int free_set(const double *k, const double *grad, const double *lo, const double *hi, int n,
                    int *idx) {
    int nf = 0;
    for (int i = 0; i < n; ++i) {
        int clamped = (k[i] <= lo[i] && grad[i] > 0.0) || (k[i] >= hi[i] && grad[i] < 0.0);
        if (!clamped) idx[nf++] = i;
    }
    return nf;
}

static void gather(const double *H, int n, const int *idx, int nf, double *Hf) {
    for (int a = 0; a < nf; ++a)
        for (int b = 0; b < nf; ++b) Hf[a * nf + b] = H[idx[a] * n + idx[b]];
}

/* Projected-Newton box QP (occore.lq.box_qp.box_qp with max_iter=100, tol=1e-13):
 * minimise 1/2 k'Hk + g'k on lo <= k <= hi. On return: k, the free indices idx[0..*nf) and the
 * Cholesky factor Lf (nf x nf) of H on them. Returns 0, or 1 when a factorisation failed.
 * w: workspace of 5n doubles. */
static int box_qp(const double *H, const double *g, const double *lo, const double *hi,
                  const double *k0, int n, double *k, int *idx, int *nf_out, double *Lf, double *w) {
    const int max_iter = 100;
    const double tol = 1e-13;
    double *grad = w, *step = w + n, *cand = w + 2 * n, *gf = w + 3 * n;
    int nf;
    for (int i = 0; i < n; ++i) {
        double v = k0 ? k0[i] : 0.0;
        k[i] = clamp(v, lo[i], hi[i]);
    }
    double fk = qp_value(H, g, k, n);
    for (int it = 0; it < max_iter; ++it) {
        for (int i = 0; i < n; ++i) {
            double s = 0.0;   /* g + H k, summed as numpy does */
            for (int j = 0; j < n; ++j) s += H[i * n + j] * k[j];
            grad[i] = g[i] + s;
        }
        nf = free_set(k, grad, lo, hi, n, idx);
        if (nf == 0) { *nf_out = 0; return 0; }
        gather(H, n, idx, nf, Lf);
        if (chol(Lf, nf)) return 1;
        double nrm = 0.0;
        for (int a = 0; a < nf; ++a) { gf[a] = grad[idx[a]]; nrm += gf[a] * gf[a]; }
        if (sqrt(nrm) < tol) break;
        chol_solve(Lf, nf, gf);
        for (int i = 0; i < n; ++i) step[i] = 0.0;
        for (int a = 0; a < nf; ++a) step[idx[a]] = -gf[a];
        double expected = 0.0;
        for (int i = 0; i < n; ++i) expected += grad[i] * step[i];
        if (expected >= -tol * max1(fabs(fk))) break;
        double alpha = 1.0, fc = 0.0;
        int accepted = 0;
        while (alpha > 1e-10) {
            double lin = 0.0;
            for (int i = 0; i < n; ++i) {
                cand[i] = clamp(k[i] + alpha * step[i], lo[i], hi[i]);
            }
            fc = qp_value(H, g, cand, n);
            for (int i = 0; i < n; ++i) lin += grad[i] * (cand[i] - k[i]);
            if (fc - fk <= 0.1 * lin) { accepted = 1; break; }
            alpha *= 0.5;
        }
        if (!accepted) break;
        double improvement = fk - fc;
        memcpy(k, cand, (size_t)n * sizeof(double));
        fk = fc;
        if (improvement < tol * max1(fabs(fk))) break;
    }
    /* the free set and its factor at the returned point */
    for (int i = 0; i < n; ++i) {
        double s = 0.0;
        for (int j = 0; j < n; ++j) s += H[i * n + j] * k[j];
        grad[i] = g[i] + s;
    }
    nf = free_set(k, grad, lo, hi, n, idx);
    *nf_out = nf;
    if (nf == 0) return 0;
    gather(H, n, idx, nf, Lf);
    return chol(Lf, nf);
}

OCC_EXPORT int occ_riccati_sweep(
    int T, int nx, int nu,
    const double *fx, const double *fu, const double *lx, const double *lu,
    const double *lxx, const double *lux, const double *luu,
    const double *fxx, const double *fux, const double *fuu,
    double mu,
    const double *us, const double *lower, const double *upper, const double *k_warm,
    const double *gaps,
    double *k, double *K, double *Vx_all, double *Vxx_all, double *dd)
{
    const int nxx = nx * nx, nux = nu * nx, nuu = nu * nu;
    size_t nd = (size_t)(2 * nxx + nx * nu + nx + nu + 3 * nuu + 2 * nux + nx * nu + nuu + 10 * nu + 2 * nx);
    double *buf = (double *)malloc(nd * sizeof(double));
    int *idx = (int *)malloc((size_t)(nu > 0 ? nu : 1) * sizeof(int));
    if (!buf || !idx) { free(buf); free(idx); return -2; }
    double *Vxx_fx = buf, *Qxx = Vxx_fx + nxx, *Vxx_fu = Qxx + nxx, *Qx = Vxx_fu + nx * nu,
           *Qu = Qx + nx, *Quu = Qu + nu, *H = Quu + nuu, *L = H + nuu, *Qux = L + nuu,
           *Qux_reg = Qux + nux, *KtQuu = Qux_reg + nux, *Lf = KtQuu + nx * nu, *lo = Lf + nuu,
           *hi = lo + nu, *kt = hi + nu, *rhs = kt + nu, *qpw = rhs + (nu > nx ? nu : nx),
           *Vg = qpw + 5 * nu;
    /* qpw holds 5 nu doubles; rhs max(nu, nx) <= nu + nx: total fits in 10 nu + nx; Vg nx more */
    int status = -1;
    double d1 = 0.0, d2 = 0.0;

    memcpy(Vx_all + (size_t)T * nx, lx + (size_t)T * nx, (size_t)nx * sizeof(double));
    memcpy(Vxx_all + (size_t)T * nxx, lxx + (size_t)T * nxx, (size_t)nxx * sizeof(double));
    memset(k, 0, (size_t)T * nu * sizeof(double));
    memset(K, 0, (size_t)T * nux * sizeof(double));

    for (int t = T - 1; t >= 0; --t) {
        const double *Vx = Vx_all + (size_t)(t + 1) * nx, *Vxx = Vxx_all + (size_t)(t + 1) * nxx;
        if (gaps) { /* Vx' + Vxx' gap_t, the next value's gradient expanded at the defect */
            const double *gp = gaps + (size_t)t * nx;
            for (int i = 0; i < nx; ++i) {
                double s = 0.0;
                for (int p = 0; p < nx; ++p) s += Vxx[i * nx + p] * gp[p];
                Vg[i] = Vx[i] + s;
            }
            Vx = Vg;
        }
        const double *A = fx + (size_t)t * nxx, *B = fu + (size_t)t * nx * nu;
        double *kk = k + (size_t)t * nu, *KK = K + (size_t)t * nux;
        double *Vx_new = Vx_all + (size_t)t * nx, *Vxx_new = Vxx_all + (size_t)t * nxx;

        /* Vxx fx (nx,nx), Vxx fu (nx,nu) */
        for (int i = 0; i < nx; ++i) {
            for (int j = 0; j < nx; ++j) {
                double s = 0.0;
                for (int p = 0; p < nx; ++p) s += Vxx[i * nx + p] * A[p * nx + j];
                Vxx_fx[i * nx + j] = s;
            }
            for (int j = 0; j < nu; ++j) {
                double s = 0.0;
                for (int p = 0; p < nx; ++p) s += Vxx[i * nx + p] * B[p * nu + j];
                Vxx_fu[i * nu + j] = s;
            }
        }
        /* Qx = lx + fx' Vx;  Qxx = lxx + fx' Vxx fx */
        for (int i = 0; i < nx; ++i) {
            double s = 0.0;
            for (int p = 0; p < nx; ++p) s += A[p * nx + i] * Vx[p];
            Qx[i] = lx[(size_t)t * nx + i] + s;
            for (int j = 0; j < nx; ++j) {
                double q = 0.0;
                for (int p = 0; p < nx; ++p) q += A[p * nx + i] * Vxx_fx[p * nx + j];
                Qxx[i * nx + j] = lxx[(size_t)t * nxx + i * nx + j] + q;
            }
        }
        /* Qu = lu + fu' Vx;  Qux = lux + fu' Vxx fx;  Quu = luu + fu' Vxx fu */
        for (int a = 0; a < nu; ++a) {
            double s = 0.0;
            for (int p = 0; p < nx; ++p) s += B[p * nu + a] * Vx[p];
            Qu[a] = lu[(size_t)t * nu + a] + s;
            for (int j = 0; j < nx; ++j) {
                double q = 0.0;
                for (int p = 0; p < nx; ++p) q += B[p * nu + a] * Vxx_fx[p * nx + j];
                Qux[a * nx + j] = lux[(size_t)t * nux + a * nx + j] + q;
            }
            for (int b = 0; b < nu; ++b) {
                double q = 0.0;
                for (int p = 0; p < nx; ++p) q += B[p * nu + a] * Vxx_fu[p * nu + b];
                Quu[a * nu + b] = luu[(size_t)t * nuu + a * nu + b] + q;
            }
        }
        if (fxx) { /* + Vx' . (fxx, fux, fuu) */
            const double *Fxx = fxx + (size_t)t * nx * nxx, *Fux = fux + (size_t)t * nx * nux,
                         *Fuu = fuu + (size_t)t * nx * nuu;
            for (int m = 0; m < nxx; ++m) {
                double s = 0.0;
                for (int i = 0; i < nx; ++i) s += Vx[i] * Fxx[(size_t)i * nxx + m];
                Qxx[m] += s;
            }
            for (int m = 0; m < nux; ++m) {
                double s = 0.0;
                for (int i = 0; i < nx; ++i) s += Vx[i] * Fux[(size_t)i * nux + m];
                Qux[m] += s;
            }
            for (int m = 0; m < nuu; ++m) {
                double s = 0.0;
                for (int i = 0; i < nx; ++i) s += Vx[i] * Fuu[(size_t)i * nuu + m];
                Quu[m] += s;
            }
        }
        /* symmetrise Quu; H = Quu + mu (fu'fu + CONTROL_REG I); Qux_reg = Qux + mu fu'fx */
        for (int a = 0; a < nu; ++a)
            for (int b = a + 1; b < nu; ++b) {
                double s = 0.5 * (Quu[a * nu + b] + Quu[b * nu + a]);
                Quu[a * nu + b] = Quu[b * nu + a] = s;
            }
        for (int a = 0; a < nu; ++a) {
            for (int b = 0; b < nu; ++b) {
                double s = 0.0;
                for (int p = 0; p < nx; ++p) s += B[p * nu + a] * B[p * nu + b];
                if (a == b) s += CONTROL_REG;
                H[a * nu + b] = Quu[a * nu + b] + mu * s;
            }
            for (int j = 0; j < nx; ++j) {
                double s = 0.0;
                for (int p = 0; p < nx; ++p) s += B[p * nu + a] * A[p * nx + j];
                Qux_reg[a * nx + j] = Qux[a * nx + j] + mu * s;
            }
        }

        /* gains */
        if (!lower) {
            memcpy(L, H, (size_t)nuu * sizeof(double));
            if (chol(L, nu)) { status = t; break; }
            for (int a = 0; a < nu; ++a) rhs[a] = Qu[a];
            chol_solve(L, nu, rhs);
            for (int a = 0; a < nu; ++a) kt[a] = -rhs[a];
            for (int j = 0; j < nx; ++j) {
                for (int a = 0; a < nu; ++a) rhs[a] = Qux_reg[a * nx + j];
                chol_solve(L, nu, rhs);
                for (int a = 0; a < nu; ++a) KK[a * nx + j] = -rhs[a];
            }
        } else {
            const double *u = us + (size_t)t * nu;
            int nf = 0;
            for (int a = 0; a < nu; ++a) {
                lo[a] = lower[(size_t)t * nu + a] - u[a];
                hi[a] = upper[(size_t)t * nu + a] - u[a];
            }
            if (box_qp(H, Qu, lo, hi, k_warm ? k_warm + (size_t)t * nu : NULL, nu, kt, idx, &nf, Lf,
                       qpw)) { status = t; break; }
            /* rows of K: zero on the clamped set, -Lf^-T Lf^-1 Qux_reg[free] on the free set */
            for (int j = 0; j < nx; ++j) {
                for (int c = 0; c < nf; ++c) rhs[c] = Qux_reg[idx[c] * nx + j];
                chol_solve(Lf, nf, rhs);
                for (int c = 0; c < nf; ++c) KK[idx[c] * nx + j] = -rhs[c];
            }
        }
        memcpy(kk, kt, (size_t)nu * sizeof(double));

        /* expected decrease terms */
        {
            double s1 = 0.0, s2 = 0.0;
            for (int a = 0; a < nu; ++a) {
                s1 += Qu[a] * kt[a];
                double q = 0.0;
                for (int b = 0; b < nu; ++b) q += kt[b] * Quu[b * nu + a];
                s2 += q * kt[a];
            }
            d1 += s1;
            d2 += s2;
        }
        /* KtQuu = K' Quu (nx,nu) */
        for (int i = 0; i < nx; ++i)
            for (int b = 0; b < nu; ++b) {
                double s = 0.0;
                for (int a = 0; a < nu; ++a) s += KK[a * nx + i] * Quu[a * nu + b];
                KtQuu[i * nu + b] = s;
            }
        /* Vx = Qx + K'Quu k + K'Qu + Qux' k */
        for (int i = 0; i < nx; ++i) {
            double s1 = 0.0, s2 = 0.0, s3 = 0.0;
            for (int a = 0; a < nu; ++a) {
                s1 += KtQuu[i * nu + a] * kt[a];
                s2 += KK[a * nx + i] * Qu[a];
                s3 += Qux[a * nx + i] * kt[a];
            }
            Vx_new[i] = Qx[i] + s1 + s2 + s3;
        }
        /* Vxx = Qxx + K'Quu K + K'Qux + Qux'K, symmetrised */
        for (int i = 0; i < nx; ++i)
            for (int j = 0; j < nx; ++j) {
                double s1 = 0.0, s2 = 0.0, s3 = 0.0;
                for (int a = 0; a < nu; ++a) {
                    s1 += KtQuu[i * nu + a] * KK[a * nx + j];
                    s2 += KK[a * nx + i] * Qux[a * nx + j];
                    s3 += Qux[a * nx + i] * KK[a * nx + j];
                }
                Vxx_new[i * nx + j] = Qxx[i * nx + j] + s1 + s2 + s3;
            }
        for (int i = 0; i < nx; ++i)
            for (int j = i + 1; j < nx; ++j) {
                double s = 0.5 * (Vxx_new[i * nx + j] + Vxx_new[j * nx + i]);
                Vxx_new[i * nx + j] = Vxx_new[j * nx + i] = s;
            }
    }
    dd[0] = d1;
    dd[1] = d2;
    free(buf);
    free(idx);
    return status;
}

/* lam_T = lx_T, lam_t = lx_t + fx_t' lam_{t+1};  grad_t = lu_t + fu_t' lam_{t+1}. */
OCC_EXPORT void occ_adjoint_sweep(int T, int nx, int nu, const double *fx, const double *fu,
                                  const double *lx, const double *lu, double *lam, double *grad) {
    memcpy(lam + (size_t)T * nx, lx + (size_t)T * nx, (size_t)nx * sizeof(double));
    for (int t = T - 1; t >= 0; --t) {
        const double *A = fx + (size_t)t * nx * nx, *B = fu + (size_t)t * nx * nu;
        const double *ln = lam + (size_t)(t + 1) * nx;
        for (int i = 0; i < nx; ++i) {
            double s = 0.0;
            for (int p = 0; p < nx; ++p) s += A[p * nx + i] * ln[p];
            lam[(size_t)t * nx + i] = lx[(size_t)t * nx + i] + s;
        }
        for (int a = 0; a < nu; ++a) {
            double s = 0.0;
            for (int p = 0; p < nx; ++p) s += B[p * nu + a] * ln[p];
            grad[(size_t)t * nu + a] = lu[(size_t)t * nu + a] + s;
        }
    }
}

/* ABI version, checked by csweep.py. */
/* The gap terms (F1, F2, Fd) of occore.local_model.gap_terms: with gap (T+1,nx) = gap_0..gap_T,
 * Pg_t = Vxx_t gap_t, F1 = sum Vx_t.gap_t, F2 = sum gap_t.Pg_t, Fd = sum Pg_t.dx_t along the linear
 * model's states dx_0 = gap_0, dx_{t+1} = fx_t dx_t + fu_t (k_t + K_t dx_t) + gap_{t+1}.
 * Returns 0, or -2 when out of memory. */
OCC_EXPORT int occ_gap_terms(int T, int nx, int nu, const double *fx, const double *fu, const double *k,
                             const double *K, const double *gap, const double *Vx, const double *Vxx,
                             double *out) {
    double *dx = malloc((size_t)(2 * nx + nu) * sizeof(double));
    if (!dx) return -2;
    double *nxt = dx + nx, *v = dx + 2 * nx;
    double F1 = 0.0, F2 = 0.0, Fd = 0.0;
    memcpy(dx, gap, (size_t)nx * sizeof(double));
    for (int t = 0; t <= T; ++t) {
        const double *g = gap + (size_t)t * nx, *P = Vxx + (size_t)t * nx * nx, *vx = Vx + (size_t)t * nx;
        for (int i = 0; i < nx; ++i) {
            double pg = 0.0;
            for (int j = 0; j < nx; ++j) pg += P[i * nx + j] * g[j];
            F1 += vx[i] * g[i];
            F2 += g[i] * pg;
            Fd += pg * dx[i];
        }
        if (t == T) break;
        const double *A = fx + (size_t)t * nx * nx, *B = fu + (size_t)t * nx * nu;
        const double *kt = k + (size_t)t * nu, *Kt = K + (size_t)t * nu * nx, *gn = g + nx;
        for (int a = 0; a < nu; ++a) {                   /* v = k_t + K_t dx_t */
            double s = kt[a];
            for (int j = 0; j < nx; ++j) s += Kt[a * nx + j] * dx[j];
            v[a] = s;
        }
        for (int i = 0; i < nx; ++i) {
            double s = gn[i];
            for (int j = 0; j < nx; ++j) s += A[i * nx + j] * dx[j];
            for (int a = 0; a < nu; ++a) s += B[i * nu + a] * v[a];
            nxt[i] = s;
        }
        memcpy(dx, nxt, (size_t)nx * sizeof(double));
    }
    out[0] = F1; out[1] = F2; out[2] = Fd;
    free(dx);
    return 0;
}

/* The states and controls of the linear model under the policy (k, K) (occore.local_model.linear_states):
 * dx_0 = gap_0, du_t = k_t + K_t dx_t, dx_{t+1} = fx_t dx_t + fu_t du_t + gap_{t+1}; gap (T+1,nx),
 * outputs dx (T+1,nx), du (T,nu). */
OCC_EXPORT void occ_linear_states(int T, int nx, int nu, const double *fx, const double *fu, const double *k,
                                  const double *K, const double *gap, double *dx, double *du) {
    memcpy(dx, gap, (size_t)nx * sizeof(double));
    for (int t = 0; t < T; ++t) {
        const double *A = fx + (size_t)t * nx * nx, *B = fu + (size_t)t * nx * nu;
        const double *kt = k + (size_t)t * nu, *Kt = K + (size_t)t * nu * nx, *gn = gap + (size_t)(t + 1) * nx;
        const double *x = dx + (size_t)t * nx;
        double *v = du + (size_t)t * nu, *nxt = dx + (size_t)(t + 1) * nx;
        for (int a = 0; a < nu; ++a) {
            double s = kt[a];
            for (int j = 0; j < nx; ++j) s += Kt[a * nx + j] * x[j];
            v[a] = s;
        }
        for (int i = 0; i < nx; ++i) {
            double s = gn[i];
            for (int j = 0; j < nx; ++j) s += A[i * nx + j] * x[j];
            for (int a = 0; a < nu; ++a) s += B[i * nu + a] * v[a];
            nxt[i] = s;
        }
    }
}

OCC_EXPORT int occ_sweep_abi(void) { return 4; }

/* The first 60 bits of the SHA-256 of this file when it was built (setup.py defines it; 0: unknown).
 * csweep.py compares it with the source next to the library to detect a stale build. */
#ifndef OCC_SOURCE_HASH
#define OCC_SOURCE_HASH 0
#endif
OCC_EXPORT unsigned long long occ_source_hash(void) { return (unsigned long long)OCC_SOURCE_HASH; }
