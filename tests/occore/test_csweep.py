"""The compiled (C) sweeps against the numpy references: same results to 1e-12, same errors."""
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import occore
from occore.derivatives.base import DenseDerivatives
from occore.errors import NotPositiveDefinite
from occore.lq import adjoint, compiled, csweep, riccati

needs_c = pytest.mark.skipif(not csweep.available(), reason=f"compiled sweep unavailable: {csweep.load_error()}")

RTOL = 1e-12


def _spd(rng, n, scale=1.0, shift=0.5):
    A = rng.standard_normal((n, n))
    return scale * (A @ A.T / n + shift * np.eye(n))


def random_model(rng, T, nx, nu, second_order=False, hess_scale=0.01):
    """A random, well-posed local model (cost Hessians positive definite)."""
    fx = 0.9 * np.eye(nx) + 0.2 / np.sqrt(nx) * rng.standard_normal((T, nx, nx))
    fu = rng.standard_normal((T, nx, nu))
    lxx = np.stack([_spd(rng, nx) for _ in range(T + 1)])
    luu = np.stack([_spd(rng, nu, 1.0) for _ in range(T)])
    lux = 0.1 * rng.standard_normal((T, nu, nx))
    kw = {}
    if second_order:
        fxx = hess_scale * rng.standard_normal((T, nx, nx, nx))
        fuu = hess_scale * rng.standard_normal((T, nx, nu, nu))
        kw = dict(fxx=fxx + fxx.transpose(0, 1, 3, 2), fux=hess_scale * rng.standard_normal((T, nx, nu, nx)),
                  fuu=fuu + fuu.transpose(0, 1, 3, 2))
    return DenseDerivatives(f=rng.standard_normal((T, nx)), l=rng.random(T), lf=1.0, fx=fx, fu=fu,
                            lx=rng.standard_normal((T + 1, nx)), lu=rng.standard_normal((T, nu)),
                            lxx=lxx, lux=lux, luu=luu, **kw)


def _run(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except NotPositiveDefinite as err:
        return err


def assert_same(d, mu, second_order, us=None, lower=None, upper=None, k_warm=None, gaps=None):
    """Runs both sweeps; they must agree to 1e-12 (relative to each output's scale) or both raise
    NotPositiveDefinite at the same stage. Returns the reference's result."""
    ref = _run(riccati.riccati_sweep, d, mu, second_order, us, lower, upper, k_warm, gaps=gaps)
    out = _run(csweep.riccati_sweep, d, mu, second_order, us, lower, upper, k_warm, gaps=gaps)
    if isinstance(ref, NotPositiveDefinite):
        assert isinstance(out, NotPositiveDefinite), "the C sweep did not raise"
        assert out.stage == ref.stage
        return ref
    assert not isinstance(out, Exception), f"the C sweep raised {out!r}"
    names = ("k", "K", "d1", "d2", "Vx", "Vxx")
    for name, a, b in zip(names, ref, out):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, name
        scale = max(1.0, float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)))
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * scale, equal_nan=True, err_msg=name)
    assert type(out[2]) is float and type(out[3]) is float
    return ref


SIZES = [(1, 1), (2, 1), (3, 2), (4, 1), (4, 2), (6, 3), (5, 5), (2, 4), (12, 4)]


@needs_c
@pytest.mark.parametrize("nx, nu", SIZES)
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("mu", [0.0, 1e-3, 10.0])
def test_random_unbounded(nx, nu, second_order, mu):
    rng = np.random.default_rng(100 * nx + nu)
    d = random_model(rng, 40, nx, nu, second_order)
    ref = assert_same(d, mu, second_order)
    assert not isinstance(ref, NotPositiveDefinite)
    # second_order=True without Hessians in the model is the first-order sweep, as in the reference
    if not second_order:
        assert_same(d, mu, True)


@needs_c
@pytest.mark.parametrize("nx, nu", [(2, 1), (4, 2), (5, 5)])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_random_with_gaps(nx, nu, second_order, bounded):
    """Multiple shooting (FDDP): the gaps enter V_x before each stage, in both sweeps alike; and
    they change the result (the comparison is not vacuous)."""
    T = 30
    rng = np.random.default_rng(11 * nx + nu)
    d = random_model(rng, T, nx, nu, second_order)
    gaps = 0.3 * rng.standard_normal((T, nx))
    us = lower = upper = None
    if bounded:
        us = 0.1 * rng.standard_normal((T, nu))
        lower, upper = us - 0.3, us + 0.3
    ref = assert_same(d, 1e-6, second_order, us, lower, upper, gaps=gaps)
    closed = assert_same(d, 1e-6, second_order, us, lower, upper)
    assert not np.allclose(ref[0], closed[0])


@needs_c
@pytest.mark.parametrize("nx, nu", [(2, 1), (4, 2), (5, 5)])
def test_gap_terms_agree_with_the_reference(nx, nu):
    """The expected change of a multiple-shooting step (F1, F2, Fd): C and numpy alike, on a policy
    and value of the gapped sweep; every term is non-zero (the comparison is not vacuous)."""
    from occore.local_model import gap_terms
    T = 30
    rng = np.random.default_rng(5 * nx + nu)
    d = random_model(rng, T, nx, nu)
    gap = 0.3 * rng.standard_normal((T + 1, nx))
    k, K, _, _, Vx, Vxx = riccati.riccati_sweep(d, 1e-6, False, gaps=gap[1:])
    ref = gap_terms(d, k, K, gap, Vx, Vxx)
    np.testing.assert_allclose(csweep.gap_terms(d, k, K, gap, Vx, Vxx), ref, rtol=1e-10, atol=0)
    assert min(abs(v) for v in ref) > 1e-3


@needs_c
@pytest.mark.parametrize("nx, nu", SIZES)
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("width", [0.05, 0.5, np.inf])
def test_random_bounded(nx, nu, second_order, width):
    """Bounds from tight (most controls clamped) to one-sided and infinite; with and without a warm
    start of the box QPs."""
    T = 40
    rng = np.random.default_rng(7 * nx + nu)
    d = random_model(rng, T, nx, nu, second_order)
    us = 0.1 * rng.standard_normal((T, nu))
    lower = us - width * rng.random((T, nu))
    upper = us + width * rng.random((T, nu))
    if nu > 1:  # one side open for some controls
        lower[:, 0] = -np.inf
    ref = assert_same(d, 1e-6, second_order, us, lower, upper)
    assert_same(d, 1e-6, second_order, us, lower, upper, k_warm=rng.standard_normal((T, nu)))
    assert not isinstance(ref, NotPositiveDefinite)
    if width == 0.05:  # the test exercises the clamped branch: some rows of K are zero
        k, K = ref[0], ref[1]
        at_bound = np.isclose(us + k, lower) | np.isclose(us + k, upper)
        assert at_bound.any()
        assert np.all(K[at_bound] == 0.0)


@needs_c
def test_bounds_clamp_every_control():
    rng = np.random.default_rng(3)
    T, nx, nu = 20, 3, 2
    d = random_model(rng, T, nx, nu)
    us = np.zeros((T, nu))
    lower, upper = np.full((T, nu), -1e-9), np.full((T, nu), 1e-9)
    d = DenseDerivatives(**{**d.__dict__, "lu": 100.0 * np.sign(d.lu)})  # pushes every control out
    k, K, *_ = assert_same(d, 0.0, False, us, lower, upper)
    at_bound = np.abs(k) == 1e-9   # (the projected-Newton arc search may stop at k = 0 on a stage)
    assert at_bound.mean() > 0.8 and np.all(K[at_bound] == 0.0)


@needs_c
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("second_order", [False, True])
def test_not_positive_definite_same_stage(bounded, second_order):
    rng = np.random.default_rng(11)
    T, nx, nu = 30, 3, 2
    d = random_model(rng, T, nx, nu, second_order)
    luu = d.luu.copy()
    luu[8] = luu[19] = -50.0 * np.eye(nu)   # the backward sweep meets stage 19 first
    d = DenseDerivatives(**{**d.__dict__, "luu": luu})
    us = np.zeros((T, nu))
    lower, upper = (-np.ones((T, nu)), np.ones((T, nu))) if bounded else (None, None)
    with pytest.raises(NotPositiveDefinite) as ref:
        riccati.riccati_sweep(d, 1e-6, second_order, us, lower, upper)
    with pytest.raises(NotPositiveDefinite) as out:
        csweep.riccati_sweep(d, 1e-6, second_order, us, lower, upper)
    assert ref.value.stage == out.value.stage == 19
    # enough regularisation (through fu' fu) cures it in both
    assert_same(d, 1e4, second_order, us, lower, upper)


@needs_c
def test_nan_propagates_like_the_reference():
    rng = np.random.default_rng(5)
    d = random_model(rng, 10, 3, 1)
    lx = d.lx.copy()
    lx[6, 1] = np.nan
    assert_same(DenseDerivatives(**{**d.__dict__, "lx": lx}), 1e-6, False)


@needs_c
def test_inputs_are_not_modified_and_outputs_are_fresh():
    rng = np.random.default_rng(9)
    T, nx, nu = 15, 4, 2
    d = random_model(rng, T, nx, nu, True)
    us, lower, upper = np.zeros((T, nu)), -np.ones((T, nu)), np.ones((T, nu))
    before = {k: np.copy(v) for k, v in d.__dict__.items() if isinstance(v, np.ndarray)}
    a = csweep.riccati_sweep(d, 1e-3, True, us, lower, upper)
    b = csweep.riccati_sweep(d, 1e-3, True, us, lower, upper)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(d, k), v, err_msg=k)
    assert a[0] is not b[0] and a[5] is not b[5]
    np.testing.assert_array_equal(a[1], b[1])


@needs_c
@pytest.mark.parametrize("name", occore.problems.NAMES)
@pytest.mark.parametrize("second_order", [False, True])
def test_zoo_local_models(name, second_order):
    """Every reference problem's local model: at the zero guess and after a few iterations."""
    prob = occore.problems.make(name)
    traj0 = prob.rollout(prob.initial_controls())
    res = occore.ILQR(max_iter=4).solve(prob)
    for xs, us in ((traj0.xs, traj0.us), (res.xs, res.us)):
        d = prob.evaluate_derivatives(xs, us, second_order)
        for mu in (0.0, 1e-9, 1e-3, 1.0):
            assert_same(d, mu, second_order, us, prob.u_lower, prob.u_upper)
    lam, grad = adjoint.adjoint_sweep(d)
    lam_c, grad_c = csweep.adjoint_sweep(d)
    np.testing.assert_allclose(lam_c, lam, rtol=RTOL, atol=RTOL * max(1.0, np.abs(lam).max()))
    np.testing.assert_allclose(grad_c, grad, rtol=RTOL, atol=RTOL * max(1.0, np.abs(grad).max()))


@needs_c
@pytest.mark.parametrize("nx, nu", SIZES)
def test_random_adjoint(nx, nu):
    d = random_model(np.random.default_rng(nx + 10 * nu), 25, nx, nu)
    for a, b in zip(adjoint.adjoint_sweep(d), csweep.adjoint_sweep(d)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=RTOL * max(1.0, np.abs(a).max()))


@needs_c
def test_solvers_use_the_compiled_sweep():
    assert compiled.best_sweep() is csweep.riccati_sweep
    assert compiled.best_adjoint() is csweep.adjoint_sweep
    prob = occore.problems.make("pendulum")
    lm = prob.local_model(prob.rollout(prob.initial_controls()))
    assert lm._sweep is csweep.riccati_sweep


@needs_c
@pytest.mark.parametrize("solver", [occore.ILQR, occore.DDP])
def test_same_iterates_as_numpy_sweep(solver, monkeypatch):
    """A whole solve with the C sweep follows the numpy one (pendulum_box: bounds and box QPs)."""
    prob = occore.problems.make("pendulum_box")
    res_c = solver(max_iter=15).solve(prob)
    monkeypatch.setattr(compiled, "best_sweep", lambda: riccati.riccati_sweep)
    res_np = solver(max_iter=15).solve(prob)
    assert res_c.iterations == res_np.iterations
    np.testing.assert_allclose(res_c.us, res_np.us, rtol=1e-9, atol=1e-9)
    assert [h.step for h in res_c.history] == [h.step for h in res_np.history]


def test_fallback_to_numpy_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(csweep, "available", lambda: False)
    monkeypatch.setattr(csweep, "load_error", lambda: "not built (test)")
    monkeypatch.setattr(compiled, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="occore"):
        assert compiled.best_sweep() is riccati.riccati_sweep
        assert compiled.best_sweep() is riccati.riccati_sweep
        assert compiled.best_adjoint() is adjoint.adjoint_sweep
    warnings = [r for r in caplog.records if "compiled backward sweep unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "not built (test)" in warnings[0].getMessage()
    res = occore.ILQR().solve(occore.problems.make("lqr"))
    assert res.converged


def test_library_built_where_a_compiler_exists():
    """Installing occore builds the C sweep (setup.py); it may only be missing without a compiler."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler on this machine")
    assert csweep.available(), csweep.load_error()
    assert csweep.library_path() is not None


def test_disabled_by_environment_falls_back_in_a_fresh_process():
    """OCCORE_NO_CSWEEP=1: occore imports, solves with the numpy sweep and warns once."""
    code = ("import logging, occore\n"
            "from occore.lq import compiled, riccati\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "assert compiled.best_sweep() is riccati.riccati_sweep\n"
            "res = occore.ILQR().solve(occore.problems.make('pendulum'))\n"
            "assert res.converged, res.status\n")
    env = {**os.environ, "OCCORE_NO_CSWEEP": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("compiled backward sweep unavailable") == 1, out.stderr
    assert "OCCORE_NO_CSWEEP" in out.stderr


@pytest.mark.parametrize("case", ["missing", "stale"])
def test_missing_or_stale_library_is_reported(case, monkeypatch, tmp_path):
    for name in ("_lib", "_riccati", "_adjoint", "_error"):
        monkeypatch.setattr(csweep, name, None)
    monkeypatch.setattr(csweep, "_tried", False)
    monkeypatch.delenv("OCCORE_NO_CSWEEP", raising=False)
    if case == "missing":
        monkeypatch.setattr(csweep, "library_path", lambda: None)
        expected = "not built"
    else:
        if csweep.library_path() is None:
            pytest.skip("no compiled library to copy")
        lib = tmp_path / csweep.library_path().name
        lib.write_bytes(csweep.library_path().read_bytes())
        (tmp_path / "_sweep.c").write_text("/* another version */\n")
        monkeypatch.setattr(csweep, "library_path", lambda: lib)
        expected = "stale build"
    assert not csweep.available()
    assert expected in csweep.load_error()
    with pytest.raises(RuntimeError, match="unavailable"):
        csweep.riccati_sweep(None, 0.0, False)


@needs_c
def test_wrong_shapes_raise_before_the_c_code_runs():
    rng = np.random.default_rng(2)
    d = random_model(rng, 10, 3, 2, second_order=True)
    bad = DenseDerivatives(**{**d.__dict__, "fx": d.fx[:, :2, :]})
    with pytest.raises(ValueError):
        csweep.riccati_sweep(bad, 1e-3, False)
    with pytest.raises(ValueError):
        csweep.adjoint_sweep(bad)
    short = DenseDerivatives(**{**d.__dict__, "fxx": d.fxx[:5]})
    with pytest.raises(ValueError):
        csweep.riccati_sweep(short, 1e-3, True)
    with pytest.raises(ValueError):
        csweep.riccati_sweep(d, 1e-3, False, np.zeros((10, 2)), np.zeros((9, 2)), np.ones((10, 2)))


@needs_c
@pytest.mark.parametrize("nx, nu", [(1, 1), (3, 2), (2, 4)])
def test_random_linear_states(nx, nu):
    """The compiled linear rollout of FDDP equals the numpy reference on random models, shapes
    included."""
    from occore.local_model import linear_states
    rng = np.random.default_rng(nx * 10 + nu)
    T = 9
    d = random_model(rng, T, nx, nu)
    k, K = rng.standard_normal((T, nu)), 0.3 * rng.standard_normal((T, nu, nx))
    gap = rng.standard_normal((T + 1, nx))
    out, ref = csweep.linear_states(d, k, K, gap), linear_states(d, k, K, gap)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(b).max())))


@needs_c
def test_not_positive_definite_at_the_first_stage():
    """The sweep's last stage (t = 0) failing is NotPositiveDefinite(0), not another error."""
    rng = np.random.default_rng(12)
    d = random_model(rng, 6, 2, 1)
    luu = d.luu.copy()
    luu[0] = -50.0 * np.eye(1)
    d = DenseDerivatives(**{**d.__dict__, "luu": luu})
    with pytest.raises(NotPositiveDefinite) as out:
        csweep.riccati_sweep(d, 1e-6, False)
    assert out.value.stage == 0
    assert_same(d, 1e-6, False)


@needs_c
@pytest.mark.parametrize("which", ["riccati_sweep", "adjoint_sweep", "gap_terms", "linear_states"])
def test_each_entry_point_loads_the_library_on_first_use(which, monkeypatch):
    """Called first in a process (nothing loaded yet), each function loads the library itself."""
    for name in ("_lib", "_riccati", "_adjoint", "_gaps", "_linear", "_error"):
        monkeypatch.setattr(csweep, name, None)
    monkeypatch.setattr(csweep, "_tried", False)
    rng = np.random.default_rng(3)
    T, nx, nu = 4, 2, 1
    d = random_model(rng, T, nx, nu)
    k, K = rng.standard_normal((T, nu)), rng.standard_normal((T, nu, nx))
    gap, Vx = rng.standard_normal((T + 1, nx)), rng.standard_normal((T + 1, nx))
    Vxx = np.stack([_spd(rng, nx) for _ in range(T + 1)])
    args = {"riccati_sweep": (d, 1e-6, False), "adjoint_sweep": (d,),
            "gap_terms": (d, k, K, gap, Vx, Vxx), "linear_states": (d, k, K, gap)}[which]
    assert getattr(csweep, which)(*args) is not None


def _antisymmetric(rng, shape):
    A = rng.standard_normal(shape)
    return A - np.swapaxes(A, -1, -2)


@needs_c
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_antisymmetric_parts_of_the_hessians_drop_out(second_order, bounded):
    """Quu and Vxx are symmetrised at every stage, so an antisymmetric part added to luu, to lxx
    before the last stage, or to the dynamics Hessians fxx / fuu changes nothing: the C sweep gives
    the results of the symmetric model (numpy reference), and agrees with the reference on the
    asymmetric one."""
    T, nx, nu = 12, 3, 2
    rng = np.random.default_rng(21)
    d = random_model(rng, T, nx, nu, second_order, hess_scale=0.05)
    lxx = d.lxx.copy()
    lxx[:T] += 0.5 * _antisymmetric(rng, (T, nx, nx))
    extra = dict(luu=d.luu + 0.5 * _antisymmetric(rng, (T, nu, nu)), lxx=lxx)
    if second_order:
        extra.update(fxx=d.fxx + 0.05 * _antisymmetric(rng, d.fxx.shape),
                     fuu=d.fuu + 0.05 * _antisymmetric(rng, d.fuu.shape))
    skew = DenseDerivatives(**{**d.__dict__, **extra})
    us = lower = upper = None
    if bounded:
        us = np.zeros((T, nu))
        lower, upper = us - 0.2, us + 0.2
    ref = riccati.riccati_sweep(d, 1e-3, second_order, us, lower, upper)
    out = csweep.riccati_sweep(skew, 1e-3, second_order, us, lower, upper)
    for name, a, b in zip(("k", "K", "d1", "d2", "Vx", "Vxx"), ref, out):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10, err_msg=name)
    assert_same(skew, 1e-3, second_order, us, lower, upper)


def _one_stage(luu, lu, lux, lower, upper):
    """A one-stage model whose control does not move the state (fu = 0): the stage's box QP is
    min 1/2 k'luu k + lu'k on lower <= k <= upper (mu = 0, us = 0), and K = -luu_ff^-1 lux_f on its
    free set, in closed form."""
    nu, nx = lux.shape
    return DenseDerivatives(f=np.zeros((1, nx)), l=np.zeros(1), lf=0.0, fx=np.eye(nx)[None],
                            fu=np.zeros((1, nx, nu)), lx=np.zeros((2, nx)), lu=lu[None],
                            lxx=np.stack([np.eye(nx)] * 2), lux=lux[None], luu=luu[None])


@needs_c
@pytest.mark.parametrize("case", ["all clamped", "one free"])
def test_box_qp_ending_a_rounding_away_from_the_bound(case):
    """Warm-started a rounding error inside the lower bound, where the solution is, the box QP
    takes one step to the bound whose improvement is below its tolerance and stops there: the
    free set and the factor returned are those of the final point (clamped control 0: K row 0;
    control 1, when free, gets K = -lux / luu of its own), as in closed form and the reference."""
    luu, lu = np.diag([1.0, 4.0]), np.array([10.0, 0.0])
    lux = np.array([[0.5], [1.0]])
    lower, upper = np.array([[-1.0, -1.0]]), np.array([[1.0, 1.0]])
    if case == "all clamped":     # control 1 pushed to its upper bound too
        lu = np.array([10.0, -20.0])
    d = _one_stage(luu, lu, lux, lower, upper)
    us = np.zeros((1, 2))
    warm = np.array([[-1.0 + 1e-14, 1.0 if case == "all clamped" else 0.0]])
    assert_same(d, 0.0, False, us, lower, upper, k_warm=warm)
    for k, K, d1, d2, _, _ in (riccati.riccati_sweep(d, 0.0, False, us, lower, upper, warm),
                               csweep.riccati_sweep(d, 0.0, False, us, lower, upper, warm)):
        if case == "all clamped":
            np.testing.assert_array_equal(k, [[-1.0, 1.0]])
            np.testing.assert_array_equal(K, np.zeros((1, 2, 1)))   # exactly zero rows
        else:
            np.testing.assert_array_equal(k, [[-1.0, 0.0]])
            np.testing.assert_allclose(K, [[[0.0], [-0.25]]], rtol=1e-15, atol=0)
        np.testing.assert_allclose([d1, d2], [lu @ k[0], k[0] @ luu @ k[0]], rtol=1e-15)


@needs_c
def test_many_controls_bounded_with_gaps():
    """More controls than the buffers' slack (nu = 10 > nx): every workspace and index array is
    sized for nu; bounded, with gaps and a warm start, against the reference."""
    T, nx, nu = 6, 2, 10
    rng = np.random.default_rng(31)
    d = random_model(rng, T, nx, nu, True)
    us = 0.1 * rng.standard_normal((T, nu))
    lower, upper = us - 0.2 * rng.random((T, nu)), us + 0.2 * rng.random((T, nu))
    gaps = 0.3 * rng.standard_normal((T, nx))
    for warm in (None, rng.standard_normal((T, nu))):
        ref = assert_same(d, 1e-6, True, us, lower, upper, k_warm=warm, gaps=gaps)
        clamped = ref[1][:, :, 0] == 0.0
        assert 0 < np.count_nonzero(clamped) < T * nu   # free and clamped rows
        K = csweep.riccati_sweep(d, 1e-6, True, us, lower, upper, warm, gaps=gaps)[1]
        assert np.all(K[clamped] == 0.0)                # the C sweep's clamped rows: exactly 0


@needs_c
@pytest.mark.parametrize("bounded", [False, True])
def test_a_zero_pivot_is_not_positive_definite(bounded):
    """A control without cost or effect (luu = 0, fu = 0) and mu = 0: Quu~ = 0 exactly, a zero
    pivot, which fails as in LAPACK's potrf (pivot <= 0), in both sweeps at that stage."""
    T, nx = 3, 2
    luu = np.ones((T, 1, 1))
    luu[1] = 0.0
    d = DenseDerivatives(f=np.zeros((T, nx)), l=np.zeros(T), lf=0.0, fx=np.stack([np.eye(nx)] * T),
                         fu=np.zeros((T, nx, 1)), lx=np.zeros((T + 1, nx)), lu=np.zeros((T, 1)),
                         lxx=np.stack([np.eye(nx)] * (T + 1)), lux=np.zeros((T, 1, nx)), luu=luu)
    us = lower = upper = None
    if bounded:     # the zero pivot on the free set: the bounds are not active
        us, lower, upper = np.zeros((T, 1)), -np.ones((T, 1)), np.ones((T, 1))
    for sweep in (riccati.riccati_sweep, csweep.riccati_sweep):
        with pytest.raises(NotPositiveDefinite) as err:
            sweep(d, 0.0, False, us, lower, upper)
        assert err.value.stage == 1
