"""occore.solvers.options at its edges: every documented range accepts its boundary values and
refuses the values just outside it, wrong types and non-finite numbers with a ValueError naming the
option; the regularisation schedule moves mu exactly as documented."""
import math

import pytest

from occore.solvers.options import (CDDPOptions, DDPOptions, FDDPOptions, LineSearch,
                                    Regularization)

NAN, INF = float("nan"), float("inf")

ACCEPTED = [
    (Regularization, dict(initial=0.0, minimum=0.0)),
    (Regularization, dict(initial=1e-3, minimum=1e-3)),          # minimum == initial
    (Regularization, dict(initial=1e-3, maximum=1e-3)),          # maximum == initial
    (Regularization, dict(factor=1.0001)),
    (Regularization, dict(increase_below=0.0, decrease_above=1.0)),
    (Regularization, dict(increase_below=1.0, decrease_above=0.0)),
    (LineSearch, dict(steps=(1.0,))),
    (LineSearch, dict(steps=(1, 0.5))),
    (LineSearch, dict(accept_ratio=0.0)),
    (LineSearch, dict(accept_increase=1.0)),
    (LineSearch, dict(gap_warm_start=0)),
    (DDPOptions, dict(second_order_below=0.0)),
    (DDPOptions, dict(max_iter=1)),
    (CDDPOptions, dict(barrier=1e-300, barrier_min=1e-300)),    # barrier_min == barrier
    (CDDPOptions, dict(barrier_factor=0.999)),
    (CDDPOptions, dict(penalty_keep=1.0)),
    (CDDPOptions, dict(penalty=2.0, penalty_max=2.0)),           # penalty_max == penalty
    (CDDPOptions, dict(penalty_factor=1.0001)),
]

REFUSED = [
    (Regularization, "initial", [-1e-9, NAN, INF, "1"]),
    (Regularization, "minimum", [-1e-12, 1e-3, "0"]),            # 1e-3 > the default initial
    (Regularization, "factor", [1.0, 0.5, "10"]),
    (Regularization, "maximum", [0.0, -1.0, NAN, 1e-10, "1"]),  # 1e-10 < the default initial
    (Regularization, "increase_below", [-0.01, 1.01, "0.1"]),
    (Regularization, "decrease_above", [-0.01, 1.01, None]),
    (LineSearch, "steps", [(), (0.0,), (1.5,), (1.0, -0.5), ("1",)]),
    (LineSearch, "accept_ratio", [1.0, -0.1, "0.1"]),
    (LineSearch, "accept_increase", [0.99, INF, NAN, "2"]),
    (LineSearch, "gap_warm_start", [-1, 1.5, True, "2"]),
    (DDPOptions, "second_order_below", [-1e-3, "0.1"]),
    (DDPOptions, "max_iter", [0, 2.0, True]),
    (DDPOptions, "tol", [0.0, NAN, "1e-9"]),
    (CDDPOptions, "barrier", [0.0, -1.0, "0.1"]),
    (CDDPOptions, "barrier_min", [0.0, 0.2, "1e-11"]),          # 0.2 > the default barrier
    (CDDPOptions, "barrier_factor", [0.0, 1.0, "0.2"]),
    (CDDPOptions, "penalty_keep", [0.0, 1.01, "0.05"]),
    (CDDPOptions, "penalty_max", [0.5, INF, "1e12"]),            # 0.5 < the default penalty
    (CDDPOptions, "penalty_factor", [1.0, INF, "10"]),
    (CDDPOptions, "method", ["ipopt", None]),
    (FDDPOptions, "rollout", ["closed", 1]),
    (FDDPOptions, "gap_tol", [0.0, -1.0]),
]


@pytest.mark.parametrize("cls, kwargs", ACCEPTED,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k in ACCEPTED])
def test_boundary_values_are_accepted(cls, kwargs):
    opts = cls(**kwargs)
    for name, value in kwargs.items():
        got = getattr(opts, name)
        assert got == (tuple(float(a) for a in value) if name == "steps" else value)


@pytest.mark.parametrize("cls, name, values", REFUSED, ids=[f"{c.__name__}-{n}" for c, n, _ in REFUSED])
def test_values_outside_the_range_are_refused_naming_the_option(cls, name, values):
    for value in values:
        with pytest.raises(ValueError, match=rf"option {name}="):
            cls(**{name: value})


def test_regularization_schedule_at_its_thresholds():
    """mu falls after a step longer than decrease_above (not one of exactly that length), rises
    after a step of at most increase_below, and a zero mu rises to 1e-12 (then by the factor)."""
    r = Regularization(initial=1e-3, minimum=1e-9)
    assert r.after_step(1e-3, 0.5) == 1e-3
    assert r.after_step(1e-3, 0.5000001) == pytest.approx(1e-4, rel=1e-15)
    assert r.after_step(1e-3, 0.01) == pytest.approx(1e-2, rel=1e-15)
    assert r.after_step(1e-3, 0.0100001) == 1e-3
    assert r.decrease(1e-9) == 1e-9                      # never below minimum
    zero = Regularization(initial=0.0, minimum=0.0)
    assert zero.increase(0.0) == 1e-12 and zero.increase(1e-12) == pytest.approx(1e-11)
    assert zero.decrease(1e-12) == pytest.approx(1e-13)
    assert Regularization(fixed=True).after_step(1e-9, 1e-6) == 1e-9


def test_default_step_lengths():
    """The documented trial steps: 2^-k, k = 0..9 (DDP); 0.7^k, k = 0..19 (FDDP)."""
    assert LineSearch().steps == tuple(2.0 ** -k for k in range(10))
    fine = FDDPOptions().line_search
    assert len(fine.steps) == 20 and fine.steps[-1] == pytest.approx(0.7 ** 19)
    assert fine.gap_warm_start == 2
    assert math.isclose(sum(fine.steps), (1 - 0.7 ** 20) / 0.3)


def test_a_refused_option_is_an_occore_input_error():
    """Typed like every other bad argument (a ValueError too), for every solver's options."""
    import occore
    from occore.solvers.emsa import EMSAOptions, InnerSolver

    for make in (lambda: DDPOptions(max_iter=0), lambda: CDDPOptions(tol=NAN), lambda: FDDPOptions(gap_tol=0.0),
                 lambda: EMSAOptions(rho_min=0.0), lambda: InnerSolver(iterations=0), lambda: occore.ILQR(tol=-1.0)):
        with pytest.raises(occore.InputError, match="option "):
            make()


def test_numpy_scalars_are_numbers_and_bools_are_not():
    """A count out of np.arange or a tolerance out of a float32 array is accepted (stored as a
    Python int), as torch.optim accepts them; True is refused where a number is expected."""
    import numpy as np

    import occore
    from occore.solvers.emsa import EMSAOptions, InnerSolver

    opts = DDPOptions(max_iter=np.int64(7), tol=np.float32(1e-6))
    assert opts.max_iter == 7 and type(opts.max_iter) is int and opts.tol == np.float32(1e-6)
    assert LineSearch(gap_warm_start=np.int32(2), accept_ratio=np.float64(0.2)).gap_warm_start == 2
    assert type(EMSAOptions(max_iter=np.int16(3), inner=InnerSolver(iterations=np.int64(4))).inner.iterations) is int
    assert occore.FDDP(max_iter=np.int64(2)).options.max_iter == 2
    for name in ("tol", "max_iter"):
        with pytest.raises(occore.InputError, match=f"option {name}=True"):
            DDPOptions(**{name: True})
    with pytest.raises(occore.InputError, match="option max_iter="):
        DDPOptions(max_iter=np.float64(3.0))


def test_complex_arrays_are_refused_by_name_not_truncated():
    """numpy's float conversion drops imaginary parts (with only a ComplexWarning): x0, bounds,
    params, us0, xs0, MPC's measured state and simulate's x0 given complex values are refused,
    naming the argument; their real parts alone would have been accepted."""
    import numpy as np
    import pytest
    import occore
    from occore.errors import InputError

    prob = occore.problems.make("pendulum")
    base = dict(dynamics=prob.dynamics, stage_cost=prob.stage_cost, terminal_cost=prob.terminal_cost,
                x0=prob.x0, nu=prob.nu, horizon=prob.horizon)
    with pytest.raises(InputError, match="x0: expected real numbers, got complex"):
        occore.Problem(**dict(base, x0=prob.x0 + 1j))
    with pytest.raises(InputError, match="u_upper: expected real numbers"):
        occore.Problem(**dict(base, u_lower=-1.0, u_upper=np.array([1.0 + 0.5j])))
    us = np.zeros((prob.horizon, prob.nu), dtype=complex)
    with pytest.raises(InputError, match="us0: expected real numbers"):
        occore.ILQR().solve(prob, us0=us)
    xs = np.zeros((prob.horizon + 1, prob.nx), dtype=complex)
    with pytest.raises(InputError, match="xs0: expected real numbers"):
        occore.FDDP().solve(prob, xs0=xs)
    with pytest.raises(InputError, match="x: expected real numbers"):
        occore.MPC(prob, occore.ILQR(max_iter=2)).control(prob.x0 + 0j)
    with pytest.raises(InputError, match="x0: expected real numbers"):
        occore.simulate(lambda x: np.zeros(1), lambda x, u: x, 2, x0=np.array([1j, 0]))
    assert occore.Problem(**dict(base, x0=prob.x0.real)).nx == prob.nx


def test_an_unknown_backend_is_an_input_error_from_make_and_problem():
    import pytest
    import occore
    from occore.errors import InputError

    with pytest.raises(InputError, match="backend='x' is unknown"):
        occore.problems.make("pendulum", backend="x")
    prob = occore.problems.make("pendulum")
    with pytest.raises(InputError, match="backend='x' is unknown"):
        occore.Problem(prob.dynamics, prob.stage_cost, prob.terminal_cost, prob.x0, prob.nu,
                       prob.horizon, backend="x")
