"""The IPOPT reference: any :class:`occore.Problem` transcribed to a CasADi multiple-shooting NLP.

    minimise_{X, U}  sum_{t<T} l(X_t, U_t, p_t) + lf(X_T, p_T)
    subject to       X_0 = x0,   X_{t+1} = f(X_t, U_t, p_t),   lower_t <= U_t <= upper_t,
                     x_lower_t <= X_t <= x_upper_t (t >= 1),   g(X_t, U_t, p_t) <= 0,
                     h(X_T, p_T) = 0,   h_I(X_T, p_T) <= 0

The user's callables are called once more on fresh CasADi SX symbols (independently of the
problem's derivative backend), so the referee shares nothing with the solvers but the declaration.
Callables written with casadi operations transcribe, and so do numpy ones where casadi implements
the numpy functions used (``np.sin`` ...); torch callables do not (a clear InputError).
IPOPT starts from the same initial guess as the solvers: the controls ``us0`` (default
``problem.initial_controls()``) and the states of their rollout. The returned :class:`Result` is
scored like every solver's: its controls are rolled out through the problem and J is evaluated.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np

from ..errors import InputError
from ..result import IterationInfo, Result, Status
from ..validation import is_integer, is_real

__all__ = ["ipopt", "fatrop", "IPOPT_STATUS"]

logger = logging.getLogger("occore")

#: IPOPT return status -> occore Status (anything else is FAILED).
IPOPT_STATUS = {
    "Solve_Succeeded": Status.CONVERGED,
    "Solved_To_Acceptable_Level": Status.CONVERGED,
    "Maximum_Iterations_Exceeded": Status.MAX_ITER,
    "Maximum_CpuTime_Exceeded": Status.MAX_ITER,
    "Maximum_WallTime_Exceeded": Status.MAX_ITER,
    "Invalid_Number_Detected": Status.NON_FINITE,
    "User_Requested_Stop": Status.STOPPED_BY_CALLBACK,
    "Infeasible_Problem_Detected": Status.INFEASIBLE,
}


def _symbolic(ca, problem, argument, fn, *args):
    """``fn(*args)`` on SX symbols as an SX column, or an InputError saying why it cannot be."""
    try:
        with warnings.catch_warnings():   # numpy functions on casadi symbols (finite_difference
            warnings.simplefilter("ignore", FutureWarning)   # callables) work, with a notice
            out = fn(*args)
        if isinstance(out, (list, tuple)):
            out = ca.vertcat(*out)
        out = out if isinstance(out, ca.SX) else ca.SX(out)
    except Exception as err:  # noqa: BLE001 - any failure means the callable is not casadi-traceable
        raise InputError(
            f"problem: cannot transcribe {problem.name or 'the problem'} for IPOPT: its {argument} "
            f"failed on casadi symbols ({type(err).__name__}: {err}); reference.ipopt needs callables "
            f"written with casadi operations (backend 'casadi')") from err
    return ca.vec(out)


def _stage_functions(ca, problem):
    """One-stage CasADi functions f(x, u, p), l(x, u, p), lf(x, p), and the constraint functions
    g(x, u, p) and [h; h_I](x, p) (None when absent) built from the user callables."""
    nx, nu = problem.nx, problem.nu
    npar = 0 if problem.params is None else problem.params.shape[1]
    x, u, p = ca.SX.sym("x", nx), ca.SX.sym("u", nu), ca.SX.sym("p", npar)
    extra = (p,) if npar else ()
    f = _symbolic(ca, problem, "dynamics", problem.dynamics, x, u, *extra)
    l = _symbolic(ca, problem, "stage_cost", problem.stage_cost, x, u, *extra)
    lf = _symbolic(ca, problem, "terminal_cost", problem.terminal_cost, x, *extra)
    for argument, expr, size in (("dynamics", f, nx), ("stage_cost", l, 1), ("terminal_cost", lf, 1)):
        if expr.numel() != size:
            raise InputError(f"problem: cannot transcribe: {argument} gives {expr.numel()} values on "
                             f"casadi symbols, expected {size}")
    fns = [ca.Function("f", [x, u, p], [f]), ca.Function("l", [x, u, p], [l]), ca.Function("lf", [x, p], [lf])]
    g = getattr(problem, "path_constraints", None)
    fns.append(None if g is None else ca.Function("g", [x, u, p], [_symbolic(ca, problem, "path_constraints", g, x, u, *extra)]))
    terminal = [_symbolic(ca, problem, name, getattr(problem, name), x, *extra)
                for name in ("terminal_constraints", "terminal_inequalities") if getattr(problem, name, None) is not None]
    fns.append(ca.Function("h", [x, p], [ca.vertcat(*terminal)]) if terminal else None)
    return tuple(fns)


def _transcribe(ca, problem, us0, stagewise: bool):
    """The multiple-shooting NLP of ``problem``: variables w, objective, constraints [gaps; g; h]
    with their bounds, the initial guess (rollout of ``us0``), and the positions of X (T+1, nx) and
    U (T, nu) in w. ``stagewise`` orders w as x_0, u_0, x_1, ... with each stage's constraints
    together (the structure FATROP detects); otherwise w = [vec X; vec U] with all gaps first."""
    nx, nu, T = problem.nx, problem.nu, problem.horizon
    f, l, lf, g, h = _stage_functions(ca, problem)
    P = np.zeros((T + 1, 0)) if problem.params is None else np.asarray(problem.params, dtype=float)
    X = [ca.SX.sym(f"x{t}", nx) for t in range(T + 1)]
    U = [ca.SX.sym(f"u{t}", nu) for t in range(T)]
    if stagewise:
        w = ca.vertcat(*[v for t in range(T) for v in (X[t], U[t])], X[T])
        xi = np.array([[t * (nx + nu) + i for i in range(nx)] for t in range(T + 1)])
        ui = np.array([[t * (nx + nu) + nx + i for i in range(nu)] for t in range(T)])
    else:
        w = ca.vertcat(*X, *U)
        xi = np.arange(nx * (T + 1)).reshape(T + 1, nx)
        ui = nx * (T + 1) + np.arange(nu * T).reshape(T, nu)
    J = lf(X[T], P[T])
    rows, lbg, ubg, eq = [], [], [], []

    def add(expr, lo, hi, equality):
        rows.append(expr)
        n = expr.numel()
        lbg.extend([lo] * n)
        ubg.extend([hi] * n)
        eq.extend([equality] * n)

    gaps = []
    for t in range(T):
        J += l(X[t], U[t], P[t])
        gap = f(X[t], U[t], P[t]) - X[t + 1]
        gap = -gap if stagewise else gap     # FATROP's structure detection wants x_{t+1} - f = 0
        if stagewise:            # FATROP: each stage's gap-closing constraint, then its path constraints
            add(gap, 0.0, 0.0, True)
            if g is not None:
                add(g(X[t], U[t], P[t]), -np.inf, 0.0, False)
        else:
            gaps.append(gap)
    if not stagewise:
        add(ca.vertcat(*gaps), 0.0, 0.0, True)
        if g is not None:
            for t in range(T):
                add(g(X[t], U[t], P[t]), -np.inf, 0.0, False)
    if h is not None:
        hT = h(X[T], P[T])
        nh = problem.constraints.nh if hasattr(problem, "constraints") else hT.numel()
        if nh:
            add(hT[:nh], 0.0, 0.0, True)
        if hT.numel() > nh:
            add(hT[nh:], -np.inf, 0.0, False)
    nlp = {"x": w, "f": J, "g": ca.vertcat(*rows)}

    lbw = np.full(w.numel(), -np.inf)
    ubw = np.full(w.numel(), np.inf)
    lbw[xi[0]] = ubw[xi[0]] = np.asarray(problem.x0, dtype=float)
    if getattr(problem, "x_lower", None) is not None:
        lbw[xi[1:]] = problem.x_lower[1:]
        ubw[xi[1:]] = problem.x_upper[1:]
    if problem.u_lower is not None:
        lbw[ui] = np.asarray(problem.u_lower, dtype=float)
        ubw[ui] = np.asarray(problem.u_upper, dtype=float)
    if isinstance(us0, Result):       # warm start from another solver's result: its controls
        us0 = us0.us
    guess = problem.rollout(problem.initial_controls() if us0 is None else us0)
    w0 = np.empty(w.numel())
    w0[xi] = np.nan_to_num(guess.xs)
    w0[ui] = guess.us
    return dict(nlp=nlp, lbw=lbw, ubw=ubw, lbg=np.array(lbg), ubg=np.array(ubg), equality=eq,
                w0=w0, xi=xi, ui=ui, ng=len(lbg))


def _non_finite_start(ca, nlp) -> str:
    """Which of the NLP's objective, constraints and their first derivatives is not finite at the
    initial guess ("" when all are): where IPOPT reports Invalid_Number_Detected at once, FATROP
    (1.1.8) does not return (an inf from exp(1000), a NaN from log of a negative state, the infinite
    slope of sqrt at 0: its linear solve spins)."""
    w, f, g = nlp["nlp"]["x"], nlp["nlp"]["f"], nlp["nlp"]["g"]
    names = ("objective", "constraints", "objective gradient", "constraint Jacobian")
    values = ca.Function("occore_start", [w], [f, g, ca.gradient(f, w), ca.jacobian(g, w)])(nlp["w0"])
    return ", ".join(name for name, v in zip(names, values)
                     if not np.all(np.isfinite(np.asarray(ca.densify(v), dtype=float))))


def _make_recorder(ca, n_w, n_g, ui):
    """An IPOPT iteration callback recording the controls of every iterate and the time it was reached."""

    class Recorder(ca.Callback):
        def __init__(self):
            ca.Callback.__init__(self)
            self.us, self.times = [], []
            self.start = time.perf_counter()
            self.construct("occore_ipopt_recorder", {})

        def get_n_in(self):
            return ca.nlpsol_n_out()

        def get_n_out(self):
            return 1

        def get_name_in(self, i):
            return ca.nlpsol_out(i)

        def get_name_out(self, i):
            return "ret"

        def get_sparsity_in(self, i):
            name = ca.nlpsol_out(i)
            if name in ("f",):
                return ca.Sparsity.scalar()
            if name in ("x", "lam_x"):
                return ca.Sparsity.dense(n_w)
            if name in ("g", "lam_g"):
                return ca.Sparsity.dense(n_g)
            return ca.Sparsity(0, 0)

        def eval(self, arg):
            w = np.asarray(arg[0]).ravel()
            self.us.append(w[ui].copy())
            self.times.append(time.perf_counter() - self.start)
            return [0]

    return Recorder()


def _check_options(name: str, options) -> None:
    if options is not None and not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise InputError(f"{name}={options!r} is invalid: expected None or a dict of option "
                         "names (str) to values")


def _flush_c_streams() -> None:
    """Flush the C library's stdio buffers (C/C++ code printing through printf or std::cout)."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):   # no C library to reach (rare platforms)
        pass


@contextlib.contextmanager
def _output_to_log(plugin: str):
    """Route what the solve writes to stdout/stderr to ``logging.getLogger("occore")``.

    Two paths reach the terminal during a CasADi solve: CasADi's own messages (its warnings, e.g.
    "Failed to calculate multipliers" after a non-finite FATROP iterate) go through Python's
    ``sys.stdout``/``sys.stderr``, and the C/C++ solvers' prints go straight to the process's file
    descriptors 1 and 2. Both are redirected for the duration of the call (the descriptors to a
    temporary file, duplicated back in ``finally``) and the text is logged instead: lines that
    speak of a warning or an error at WARNING level, the rest at DEBUG. A descriptor that cannot be
    duplicated (closed, or not a real file) is left alone; the Python-level redirect still holds.
    """
    saved, sink = {}, None
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    _flush_c_streams()
    try:
        sink = tempfile.TemporaryFile()
        for fd in (1, 2):
            try:
                copy = os.dup(fd)
            except OSError:
                continue
            try:
                os.dup2(sink.fileno(), fd)
            except OSError:
                os.close(copy)
                continue
            saved[fd] = copy
    except OSError:
        pass
    python_level = io.StringIO()
    try:
        with contextlib.redirect_stdout(python_level), contextlib.redirect_stderr(python_level):
            yield
    finally:
        _flush_c_streams()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        text = python_level.getvalue()
        if sink is not None:
            sink.seek(0)
            text += sink.read().decode("utf-8", errors="replace")
            sink.close()
        for line in text.splitlines():
            if line.strip():
                level = logging.WARNING if re.search(r"warn|error|fail", line, re.I) else logging.DEBUG
                logger.log(level, "%s: %s", plugin.upper(), line.rstrip())


def _check_problem(problem, tol, max_iter, solver: str) -> None:
    if not (hasattr(problem, "dynamics") and hasattr(problem, "nx") and hasattr(problem, "x0")):
        raise InputError(f"problem: expected an occore.Problem, got {type(problem).__name__} "
                         "(networks and other ControlProblems cannot be transcribed)")
    if getattr(problem, "backend", "casadi") == "torch":
        raise InputError(f"problem: cannot transcribe {problem.name or 'the problem'} for {solver}: its "
                         "callables use torch operations (backend 'torch'); declare it with casadi "
                         f"operations to get an {solver} reference")
    if not (is_real(tol) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol={tol!r} is invalid: expected a finite number > 0")
    if not (is_integer(max_iter) and max_iter >= 0):
        raise InputError(f"max_iter={max_iter!r} is invalid: expected an integer >= 0")


def ipopt(problem, us0=None, *, tol: float = 1e-10, max_iter: int = 3000, record: bool = True,
          ipopt_options: dict | None = None) -> Result:
    """Solve ``problem`` with CasADi + IPOPT (multiple shooting, exact Hessian).

    Args:
        problem: an :class:`occore.Problem` whose callables use casadi operations (bounds, state
            bounds, path and terminal constraints and stage parameters are transcribed).
        us0: (T, nu) initial controls (default ``problem.initial_controls()``) or a
            :class:`occore.Result` (its controls); the initial states are their rollout. Not modified.
        tol: IPOPT's ``tol``.
        max_iter: IPOPT's ``max_iter``.
        record: record every IPOPT iterate's controls and score them by a rollout, giving a
            history (cost = J of the rolled-out controls, stop = max(primal, dual infeasibility),
            step = IPOPT's primal step, regularization = IPOPT's Hessian regularisation).
        ipopt_options: further IPOPT options (e.g. ``{"linear_solver": "mumps"}``).

    Returns:
        A :class:`occore.Result` (solver "ipopt"): status from IPOPT's return status
        (:data:`IPOPT_STATUS`), IPOPT's iteration count, the wall time of the IPOPT call (the
        transcription's time is in the message), and the rollout of IPOPT's controls
        (xs (T+1, nx), us (T, nu), cost, constraint_violation); ``multipliers`` holds IPOPT's duals
        (``lam_g``: gaps, path and terminal constraints in the NLP's order; ``lam_x``). Bounds are
        kept exactly (``bound_relax_factor`` 0).

    Raises:
        InputError: the problem cannot be transcribed (e.g. backend "torch"), or a bad option.

    Example:
        >>> import occore
        >>> res = occore.reference.ipopt(occore.problems.make("pendulum"))
        >>> res.status.name, round(res.cost, 8)
        ('CONVERGED', 3.03850117)
    """
    _check_problem(problem, tol, max_iter, "IPOPT")
    _check_options("ipopt_options", ipopt_options)
    if not isinstance(record, bool):
        raise InputError(f"record={record!r} is invalid: expected True or False")
    # bound_relax_factor 0: IPOPT would otherwise let U exceed the box by ~1e-8, which a swing-up
    # amplifies (x1.2 per stage near the upright) into a 1e-4 change of the clamped rollout's cost.
    ipopt_opts = {"print_level": 0, "sb": "yes", "tol": float(tol), "max_iter": int(max_iter),
                  "bound_relax_factor": 0.0, **(ipopt_options or {})}
    return _solve(problem, us0, "ipopt", {"ipopt": ipopt_opts}, stagewise=False, record=record)


def fatrop(problem, us0=None, *, tol: float = 1e-10, max_iter: int = 3000,
           fatrop_options: dict | None = None) -> Result:
    """Solve ``problem`` with CasADi + FATROP (the same multiple-shooting NLP as :func:`ipopt`,
    ordered stage by stage so that FATROP's structure detection sees the optimal-control structure;
    exact Hessian, FATROP's generalised Riccati linear solver).

    Args: as :func:`ipopt`, with ``fatrop_options`` passed to FATROP. No per-iterate history.

    Returns:
        A :class:`occore.Result` (solver "fatrop"), scored by the rollout of FATROP's controls.

    Example:
        >>> import occore
        >>> res = occore.reference.fatrop(occore.problems.make("pendulum"))
        >>> res.status.name, round(res.cost, 6)
        ('CONVERGED', 3.038501)
    """
    _check_problem(problem, tol, max_iter, "FATROP")
    _check_options("fatrop_options", fatrop_options)
    opts = {"structure_detection": "auto",
            "fatrop": {"print_level": 0, "tol": float(tol), "max_iter": int(max_iter), **(fatrop_options or {})}}
    return _solve(problem, us0, "fatrop", opts, stagewise=True, record=False)


def _solve(problem, us0, plugin: str, plugin_opts: dict, stagewise: bool, record: bool) -> Result:
    import casadi as ca

    start = time.perf_counter()
    nlp = _transcribe(ca, problem, us0, stagewise)
    if plugin == "fatrop":
        bad = _non_finite_start(ca, nlp)
        if bad:   # FATROP (1.1.8) does not return from such a start: its linear solve spins
            us = np.asarray(nlp["w0"])[nlp["ui"]]
            final = problem.rollout(us)
            violation = (problem.constraint_violation(final.xs, final.us)
                         if hasattr(problem, "constraint_violation") else 0.0)
            return Result(xs=final.xs, us=final.us, cost=final.cost, status=Status.NON_FINITE,
                          iterations=0, history=[], policy=None,
                          message=f"FATROP: not run, the NLP is not finite at the initial guess ({bad})",
                          solver=plugin, wall_time=0.0, constraint_violation=violation)
    # show_eval_warnings: CasADi would print "NaN detected" on stderr; the status says it (NON_FINITE)
    opts = {"print_time": False, "show_eval_warnings": False, **plugin_opts}
    if plugin == "fatrop":
        opts["equality"] = list(nlp["equality"])
    recorder = _make_recorder(ca, nlp["w0"].size, nlp["ng"], nlp["ui"]) if record else None
    if recorder is not None:
        opts["iteration_callback"] = recorder
    try:
        with _output_to_log(plugin):
            solver = ca.nlpsol(f"occore_{plugin}", plugin, nlp["nlp"], opts)
    except RuntimeError as err:
        raise InputError(f"{plugin}_options: {plugin.upper()} refused the options ({err})") from err
    setup = time.perf_counter() - start
    try:
        with _output_to_log(plugin):
            # (timed inside the capture: wall_time is the solver's call alone, as the solvers' is theirs)
            solve_start = time.perf_counter()
            if recorder is not None:
                recorder.start = solve_start
            try:
                sol = solver(x0=nlp["w0"], lbx=nlp["lbw"], ubx=nlp["ubw"], lbg=nlp["lbg"], ubg=nlp["ubg"])
            finally:
                wall = time.perf_counter() - solve_start
    except RuntimeError as err:
        # FATROP reads its options only when called: an unknown name or a value of the wrong type
        if plugin == "fatrop" and re.search(r"option not supported|type mismatch", str(err)):
            raise InputError(f"{plugin}_options: {plugin.upper()} refused the options "
                             f"{plugin_opts[plugin]} ({str(err).strip().splitlines()[-1]})") from err
        raise
    stats = solver.stats()
    if plugin == "ipopt":
        return_status = stats.get("return_status", "unknown")
        status = IPOPT_STATUS.get(return_status, Status.FAILED)
    else:
        return_status = stats.get("unified_return_status", str(stats.get("return_status")))
        status = Status.CONVERGED if stats.get("success") else (
            Status.MAX_ITER if "MAX_ITER" in return_status else Status.FAILED)
    if "Infeasible" in str(return_status):
        status = Status.INFEASIBLE

    us = np.asarray(sol["x"]).ravel()[nlp["ui"]]
    us = problem.clamp(us) if hasattr(problem, "clamp") else us
    final = problem.rollout(us)
    history = []
    if recorder is not None:
        history = _history(problem, recorder, stats)
    iterations = int(stats.get("iter_count", len(history)))
    if not math.isfinite(final.cost) and status is Status.CONVERGED:
        status = Status.NON_FINITE
    violation = problem.constraint_violation(final.xs, final.us) if hasattr(problem, "constraint_violation") else 0.0
    duals = {"lam_g": np.asarray(sol["lam_g"]).ravel(), "lam_x": np.asarray(sol["lam_x"]).ravel()}
    return Result(xs=final.xs, us=final.us, cost=final.cost, status=status, iterations=iterations,
                  history=history, policy=None,
                  message=f"{plugin.upper()}: {return_status}; transcription {setup * 1e3:.0f} ms",
                  solver=plugin, wall_time=wall, constraint_violation=violation, multipliers=duals)


def _history(problem, recorder, stats):
    """IterationInfo of every IPOPT iterate (iterate 0 is the initial guess and is skipped)."""
    it = stats.get("iterations", {})
    inf_pr, inf_du = it.get("inf_pr", []), it.get("inf_du", [])
    alpha, reg = it.get("alpha_pr", []), it.get("regularization_size", [])
    history, prev = [], None
    constrained = bool(getattr(getattr(problem, "constraints", None), "any", False))
    for k, (us, t) in enumerate(zip(recorder.us, recorder.times)):
        cost = problem.rollout(problem.clamp(us) if hasattr(problem, "clamp") else us).cost
        if k > 0:
            def at(seq):
                return float(seq[k]) if k < len(seq) else float("nan")
            history.append(IterationInfo(
                iteration=k - 1, cost=cost, expected_decrease=float("nan"),
                actual_decrease=prev - cost, step=at(alpha), regularization=at(reg),
                stop=max(at(inf_pr), at(inf_du)), wall_time=t, accepted=True,
                constraint_violation=at(inf_pr) if constrained else 0.0))
        prev = cost
    return history
