"""The projected-Newton box QP against an exact solution by enumeration of the active sets."""
import itertools

import numpy as np
import pytest

from occore.lq.box_qp import box_qp


def exact_box_qp(H, g, lower, upper):
    """min 1/2 k'Hk + g'k on the box, by trying every assignment of each coordinate to lower /
    upper / free (3^n): the feasible KKT point of least value (H positive definite: unique)."""
    n = len(g)
    best = None
    for sides in itertools.product((-1, 0, 1), repeat=n):
        k = np.zeros(n)
        fixed = np.array([s != 0 for s in sides])
        for i, s in enumerate(sides):
            if s:
                k[i] = lower[i] if s < 0 else upper[i]
        if not np.all(np.isfinite(k[fixed])):
            continue
        free = ~fixed
        if free.any():
            rhs = -(g[free] + H[np.ix_(free, fixed)] @ k[fixed])
            k[free] = np.linalg.solve(H[np.ix_(free, free)], rhs)
        if np.any(k < lower - 1e-12) or np.any(k > upper + 1e-12):
            continue
        value = 0.5 * k @ H @ k + g @ k
        if best is None or value < best[0]:
            best = (value, k)
    return best[1]


CASES = [(n, seed) for n in (1, 2, 3, 4, 5) for seed in range(8)]


@pytest.mark.parametrize("n,seed", CASES)
def test_box_qp_reaches_the_exact_solution(n, seed):
    rng = np.random.default_rng(100 * n + seed)
    A = rng.standard_normal((n, n))
    H = A @ A.T + (0.05 + seed % 3) * np.eye(n)         # from ill- to well-conditioned
    g = 3 * rng.standard_normal(n)
    lower, upper = -rng.random(n), rng.random(n)
    if n > 1:
        lower[0] = -np.inf                                # a one-sided coordinate
    k0 = rng.uniform(-2, 2, n) if seed % 2 else None      # warm start (clamped into the box)
    k, free, L = box_qp(H, g, lower, upper, k0=k0)
    ref = exact_box_qp(H, g, lower, upper)
    np.testing.assert_allclose(k, ref, rtol=0, atol=1e-9)
    grad = g + H @ k
    at_lower, at_upper = np.isclose(k, lower), np.isclose(k, upper)
    np.testing.assert_array_equal(free, ~((at_lower & (grad > 0)) | (at_upper & (grad < 0))))
    if free.any():
        np.testing.assert_allclose(L @ L.T, H[np.ix_(free, free)], atol=1e-12)
        np.testing.assert_allclose(grad[free], 0, atol=1e-8)    # stationary on the free set
    else:
        assert L is None


def test_a_few_iterations_suffice():
    """Projected Newton converges in a handful of iterations on a small box QP: with max_iter=8
    it already has the exact solution (a broken step or line search needs far more)."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        A = rng.standard_normal((4, 4))
        H, g = A @ A.T + 0.5 * np.eye(4), 4 * rng.standard_normal(4)
        lower, upper = -np.ones(4), np.ones(4)
        k, _, _ = box_qp(H, g, lower, upper, max_iter=8)
        np.testing.assert_allclose(k, exact_box_qp(H, g, lower, upper), atol=1e-9)
