"""Class 7 of issue 13: E-MSA converges on any well-posed LQR of a stated family within a stated
bound, checked against the optimum of a dense solve (independent of the Riccati sweep).

The family (seeds 0-19 below): x+ = A x + B u with nx in 2..8, nu in 1..4, A random with spectral
radius in [0.3, 0.95], diagonal weights Q in [0.1, 10], R in [0.1, 3.2], Qf in [1, 10], T = 30.
The bound (stated in occore.solvers.emsa): with the defaults, CONVERGED within 1500 iterations and
within 1e-6 (relative) of the optimum. Measured: at most 1185 iterations (1e-6 reached after at
most 688); without momentum the same family needs up to 2364 (see EMSAOptions.momentum).
"""
import numpy as np
import pytest

import occore
from occore import EMSA, Status

ca = pytest.importorskip("casadi")

T = 30
BOUND = 1500


def random_lqr(seed):
    rng = np.random.default_rng(seed)
    nx, nu = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    A = rng.standard_normal((nx, nx))
    A *= rng.uniform(0.3, 0.95) / max(abs(np.linalg.eigvals(A)))
    B = rng.standard_normal((nx, nu))
    Q = np.diag(10 ** rng.uniform(-1, 1, nx))
    R = np.diag(10 ** rng.uniform(-1, 0.5, nu))
    Qf = np.diag(10 ** rng.uniform(0, 1, nx))
    return A, B, Q, R, Qf, rng.standard_normal(nx)


def dense_optimum(A, B, Q, R, Qf, x0):
    """min over U of 1/2 X'WX + 1/2 U'RU with X = Phi x0 + G U, by one linear solve."""
    nx, nu = B.shape
    Phi = np.vstack([np.linalg.matrix_power(A, t) for t in range(T + 1)])
    G = np.zeros(((T + 1) * nx, T * nu))
    for t in range(1, T + 1):
        for s in range(t):
            G[t * nx:(t + 1) * nx, s * nu:(s + 1) * nu] = np.linalg.matrix_power(A, t - 1 - s) @ B
    W = np.kron(np.eye(T + 1), Q)
    W[T * nx:, T * nx:] = Qf
    Rb = np.kron(np.eye(T), R)
    U = -np.linalg.solve(G.T @ W @ G + Rb, G.T @ W @ Phi @ x0)
    X = Phi @ x0 + G @ U
    return 0.5 * X @ W @ X + 0.5 * U @ Rb @ U, U.reshape(T, nu)


def lqr_problem(A, B, Q, R, Qf, x0):
    A, B, Q, R, Qf = (ca.DM(M) for M in (A, B, Q, R, Qf))
    return occore.Problem(lambda x, u: ca.mtimes(A, x) + ca.mtimes(B, u),
                          lambda x, u: 0.5 * ca.bilin(Q, x, x) + 0.5 * ca.bilin(R, u, u),
                          lambda x: 0.5 * ca.bilin(Qf, x, x), x0=x0, nu=B.shape[1], horizon=T)


def test_the_family_covers_the_stated_sizes():
    sizes = {random_lqr(seed)[1].shape for seed in range(20)}
    assert {nx for nx, _ in sizes} >= {2, 4, 6, 8} and {nu for _, nu in sizes} == {1, 2, 3, 4}


@pytest.mark.parametrize("seed", range(20))
def test_emsa_reaches_the_lqr_optimum_within_the_bound(seed):
    spec = random_lqr(seed)
    J, U = dense_optimum(*spec)
    res = EMSA().solve(lqr_problem(*spec))
    assert res.status is Status.CONVERGED, res.summary()
    assert res.iterations <= BOUND, res.summary()
    assert abs(res.cost - J) <= 1e-6 * abs(J), (res.cost, J)
    assert np.abs(res.us - U).max() <= 1e-2 * max(1.0, np.abs(U).max())


def test_momentum_restarts_keep_the_accepted_costs_monotone():
    spec = random_lqr(10)
    res = EMSA(max_iter=300).solve(lqr_problem(*spec))
    accepted = [h.cost for h in res.history if h.accepted]
    assert len(accepted) > 100 and np.all(np.diff(accepted) < 0)


def test_momentum_is_what_reaches_the_bound():
    spec = random_lqr(11)
    prob = lqr_problem(*spec)
    J, _ = dense_optimum(*spec)
    fast = EMSA(max_iter=400).solve(prob)
    plain = EMSA(max_iter=400, momentum=False).solve(prob)
    assert fast.cost - J < 0.1 * (plain.cost - J)     # the acceleration is what reaches the bound
    with pytest.raises(ValueError, match="momentum"):
        EMSA(momentum=1)
