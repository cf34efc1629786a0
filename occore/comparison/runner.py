"""Running a set of solvers on a set of problems and keeping one record per run."""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError, OccoreError
from ..output_paths import check_path_argument
from ..validation import is_integer, is_real
from .problems import resolve_problems
from .solvers import SOLVERS, make_runner

logger = logging.getLogger("occore")

__all__ = ["Record", "Comparison", "compare", "DEFAULT_SOLVERS", "LEVELS"]

DEFAULT_SOLVERS = ("ddp", "ilqr", "emsa", "ipopt")
#: relative distances to the best cost whose first crossing is reported
LEVELS = (1e-2, 1e-4)


@dataclass
class Record:
    """One solver on one problem.

    Attributes:
        problem, solver: names.
        status: the Result's status name.  message: its message.
        iterations: iterations performed.  cost: final cost J (a rollout of the final controls).
        gap: (cost - best) / |best| with best the lowest final cost of any solver on the problem.
        box_violation: largest bound violation of the final controls (0 when unbounded).
        constraint_violation: largest violation of any constraint (state bounds, path, terminal,
            control bounds) by the rollout of the final controls (0 when there are none).
        wall_time: seconds of the solve.  time_per_iteration: wall_time / iterations.
        reached: {level: (iterations, seconds) of the first iterate within level of the best, or None}.
        iteration_costs: cost after each iteration, preceded by the initial cost (index = iterations done).
        iteration_times: seconds at which each of those costs was reached (0 for the initial one).

    Example:
        >>> import occore
        >>> rec = occore.compare("lqr", "ilqr").records[0]
        >>> rec.problem, rec.solver, rec.iterations, rec.gap, rec.reached[1e-2][0]
        ('lqr', 'ilqr', 2, 0.0, 1)
    """

    problem: str
    solver: str
    status: str
    message: str
    iterations: int
    cost: float
    wall_time: float
    box_violation: float
    gap: float = float("nan")
    constraint_violation: float = 0.0
    reached: dict = field(default_factory=dict)
    iteration_costs: list = field(default_factory=list, repr=False)
    iteration_times: list = field(default_factory=list, repr=False)

    @property
    def time_per_iteration(self) -> float:
        return self.wall_time / self.iterations if self.iterations else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["time_per_iteration"] = self.time_per_iteration
        d["reached"] = {f"{lvl:g}": (None if v is None else {"iterations": v[0], "seconds": v[1]})
                        for lvl, v in self.reached.items()}
        return d


def _box_violation(problem, us) -> float:
    if getattr(problem, "u_lower", None) is None:
        return 0.0
    us = np.asarray(us, dtype=float)
    return float(max(0.0, np.max(problem.u_lower - us), np.max(us - problem.u_upper)))


#: a record counts as feasible (a candidate for the best cost) when its constraint violation is at most this
FEASIBLE = 1e-6


def _constraint_violation(problem, xs, us) -> float:
    measure = getattr(problem, "constraint_violation", None)
    return float(measure(xs, us)) if measure is not None else 0.0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class Comparison:
    """The records of a comparison, with the best cost per problem filled in.

    Example:
        >>> import occore
        >>> cmp = occore.compare("lqr", ["ilqr", "ipopt"])
        >>> [(r.solver, r.status) for r in cmp.records]
        [('ilqr', 'CONVERGED'), ('ipopt', 'CONVERGED')]
        >>> cmp.table().splitlines()[0].split()[:3]
        ['problem', 'solver', 'status']
    """

    def __init__(self, records: list, levels=LEVELS):
        self.records = list(records)
        self.levels = tuple(levels)
        self.best = {}   # the lowest cost of a feasible record (of any record where none is feasible)
        feasible = {r.problem for r in self.records if r.constraint_violation <= FEASIBLE and _finite(r.cost)}
        for r in self.records:
            if r.problem in feasible and not r.constraint_violation <= FEASIBLE:
                continue
            if _finite(r.cost) and r.cost < self.best.get(r.problem, math.inf):
                self.best[r.problem] = r.cost
        for r in self.records:
            best = self.best.get(r.problem)
            if best is None:
                continue
            scale = abs(best) if best != 0 else 1.0
            r.gap = (r.cost - best) / scale if _finite(r.cost) else float("nan")
            r.reached = {}
            for lvl in self.levels:
                hit = next((k for k, c in enumerate(r.iteration_costs) if _finite(c) and c - best <= lvl * scale), None)
                r.reached[lvl] = None if hit is None else (hit, r.iteration_times[hit])

    @property
    def problems(self) -> list:
        return list(dict.fromkeys(r.problem for r in self.records))

    @property
    def solvers(self) -> list:
        return list(dict.fromkeys(r.solver for r in self.records))

    def table(self, markdown: bool = False) -> str:
        """The comparison table (plain text, or a Markdown table for a README)."""
        from .table import format_table

        return format_table(self, markdown=markdown)

    def plot(self, path: str) -> None:
        """Cost minus best against iteration and against wall time (log scales), a column per problem."""
        from .plot import plot_comparison

        plot_comparison(self, path)

    def as_dicts(self) -> list:
        return [r.as_dict() for r in self.records]

    def to_json(self, path: str) -> None:
        """Writes the raw records (with per-iteration costs and times) as JSON to the file ``path``."""
        import json

        check_path_argument(path)          # open(1, "w") would write on stdout, then close it

        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        with open(path, "w") as fh:
            json.dump({"best": clean(self.best), "levels": list(self.levels), "records": clean(self.as_dicts())},
                      fh, indent=1)

    def __str__(self) -> str:
        return self.table()


def _solver_list(solvers) -> list:
    if isinstance(solvers, str):
        solvers = [s.strip() for s in solvers.split(",") if s.strip()]
    elif hasattr(solvers, "solve"):
        solvers = [solvers]
    elif not isinstance(solvers, (list, tuple)):
        raise InputError(f"solvers: expected names (a string or a list) or objects with solve(problem), "
                         f"got {type(solvers).__name__}")
    out = []
    for s in solvers:
        if isinstance(s, str):
            if s not in SOLVERS:
                raise InputError(f"unknown solver {s!r}; valid solvers are {', '.join(SOLVERS)}")
            if s in out:                  # two rows of one name: the table and plot would mix them
                raise InputError(f"solvers: {s!r} is given twice")
            out.append(s)
        elif hasattr(s, "solve"):
            out.append(s)
        else:
            raise InputError(f"solvers: expected names or objects with solve(problem), got {type(s).__name__}")
    if not out:
        raise InputError(f"solvers: none given; valid solvers are {', '.join(SOLVERS)}")
    return out


def _progress(total: int, enabled: bool, unit: str = "run"):
    """A tqdm bar on stderr when enabled (and installed); a no-op otherwise."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, file=sys.stderr, unit=unit, leave=False)
        except ImportError:
            pass

    class _Silent:
        def update(self, n=1):
            pass

        def set_description(self, s):
            pass

        def close(self):
            pass
    return _Silent()


def run_one(problem_name: str, problem, solver, max_iter=None, warmup: bool = True, repeat: int = 1) -> Record:
    """Solve ``problem`` with ``solver`` (a name or an object with ``solve``) and record it.

    With ``warmup`` a named solver first runs one untimed iteration, so one-time costs (lazily
    built functions, first calls) do not land in the timed solve. With ``repeat`` > 1 the solve is
    repeated and the fastest run is kept (the machine's noise only ever adds time). A solver that
    refuses the problem (an :class:`occore.OccoreError`) gives a record with status "ERROR"."""
    name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
    runner = make_runner(solver, max_iter) if isinstance(solver, str) else solver
    initial = problem.rollout(problem.initial_controls()).cost
    try:
        return _timed(problem_name, problem, name, runner, solver, initial, warmup, repeat)
    except OccoreError as err:   # e.g. IPOPT refusing a torch problem: record it, go on with the rest
        logger.warning("compare: %s / %s failed: %s", problem_name, name, err)
        return Record(problem=problem_name, solver=name, status="ERROR", message=str(err), iterations=0,
                      cost=float("nan"), wall_time=0.0, box_violation=float("nan"), constraint_violation=float("nan"),
                      iteration_costs=[initial], iteration_times=[0.0])


def _timed(problem_name, problem, name, runner, solver, initial, warmup, repeat) -> Record:
    if warmup and isinstance(solver, str):
        make_runner(solver, 1).solve(problem)
    res = None
    for _ in range(repeat):
        start = time.perf_counter()
        run = runner.solve(problem)
        elapsed = time.perf_counter() - start
        run_time = run.wall_time if run.wall_time else elapsed
        if res is None or run_time < wall:
            res, wall = run, run_time
    costs = [initial] + [h.cost for h in res.history]
    times = [0.0] + [h.wall_time for h in res.history]
    logger.info("compare: %s / %s: %s, %d iterations, cost %.12g, %.3f s", problem_name, name, res.status.name,
                res.iterations, res.cost, wall)
    return Record(problem=problem_name, solver=name, status=res.status.name, message=res.message,
                  iterations=res.iterations, cost=float(res.cost), wall_time=float(wall),
                  box_violation=_box_violation(problem, res.us),
                  constraint_violation=_constraint_violation(problem, res.xs, res.us),
                  iteration_costs=costs, iteration_times=times)


_RESOLVED: dict = {}   # in a worker process: the problems of a spec, resolved once


def _run_pair(task) -> Record:
    """One (problem, solver) pair of a parallel comparison, in a worker process: the problems are
    resolved there from the same spec (names or files), once per process."""
    spec, backend, pname, solver, max_iter, warmup, repeat = task
    key = (spec if isinstance(spec, str) else tuple(spec), backend)
    if key not in _RESOLVED:
        _RESOLVED[key] = resolve_problems(spec, backend=backend)
    return run_one(pname, _RESOLVED[key][pname], solver, max_iter, warmup, repeat)


def compare(problems="all", solvers=DEFAULT_SOLVERS, *, max_iter: int | None = None, levels=LEVELS,
            progress: bool = False, backend: str = "casadi", warmup: bool = True, repeat: int = 1,
            workers: int = 1) -> Comparison:
    """Run every solver on every problem, from the same initial guess (the problem's zeros).

    Args:
        problems: "all", reference problem names (a list or a comma-separated string), paths of
            Python files defining :class:`occore.Problem` objects, Problem objects, or a dict
            name -> Problem.
        solvers: names (see ``occore.comparison.SOLVERS``: ddp, ilqr, emsa, ipopt and variants
            such as ddp-nols, ilqr-fixedreg, emsa-gradient) or objects with ``solve(problem)``.
        max_iter: iteration limit for every named solver (default: each solver's own).
        levels: relative distances to the best cost whose first crossing is reported.
        progress: show a progress bar on stderr.
        backend: backend of the reference problems named.
        warmup: run one untimed iteration of each named solver first (see :func:`run_one`).
        repeat: solve each pair this many times and keep the fastest run.
        workers: run the (problem, solver) pairs in this many processes
            (:func:`occore.comparison.parallel.parallel_map`); the records are those of a serial
            run (times aside). Needs problems and solvers given by name or file.

    Returns:
        A :class:`Comparison` (``.table()``, ``.plot(path)``, ``.to_json(path)``, ``.records``).

    Raises:
        InputError: unknown problem or solver names (the message lists the valid ones), a problem
            file that fails to import (the message gives the file and line), a bad ``workers``
            or, with workers > 1, problems or solvers given as objects.
    """
    if max_iter is not None and not (is_integer(max_iter) and max_iter >= 1):
        raise InputError(f"max_iter={max_iter!r} is invalid: expected an integer >= 1")
    if not (is_integer(repeat) and repeat >= 1):
        raise InputError(f"repeat={repeat!r} is invalid: expected an integer >= 1")
    if not (is_integer(workers) and workers >= 1):
        raise InputError(f"workers={workers!r} is invalid: expected an integer >= 1")
    max_iter, repeat, workers = (None if max_iter is None else int(max_iter)), int(repeat), int(workers)
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)) or not levels or not all(
            is_real(v) and 0 < v < 1 for v in levels):
        raise InputError(f"levels={levels!r} is invalid: expected a non-empty list of numbers in (0, 1)")
    if not isinstance(progress, bool) or not isinstance(warmup, bool):
        raise InputError("progress, warmup: expected True or False")
    from ..derivatives import BACKENDS

    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r} is unknown; valid backends are {', '.join(BACKENDS)}")
    solver_list = _solver_list(solvers)
    if workers > 1 and (not all(isinstance(s, str) for s in solver_list) or not (
            isinstance(problems, str) or all(isinstance(p, str) for p in problems))):
        raise InputError("workers > 1 runs each pair in another process, which rebuilds the "
                         "problems and solvers from their names or files: give them by name "
                         "(or problem file), or use workers=1 for objects")
    probs = resolve_problems(problems, backend=backend)
    if workers > 1:
        from .parallel import parallel_map

        spec = problems if isinstance(problems, str) else list(problems)
        tasks = [(spec, backend, pname, s, max_iter, warmup, repeat)
                 for pname in probs for s in solver_list]
        return Comparison(parallel_map(_run_pair, tasks, workers), levels)
    bar = _progress(len(probs) * len(solver_list), progress)
    records = []
    try:
        for pname, prob in probs.items():
            for solver in solver_list:
                sname = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
                bar.set_description(f"{pname} / {sname}")
                records.append(run_one(pname, prob, solver, max_iter, warmup, repeat))
                bar.update(1)
    finally:
        bar.close()
    return Comparison(records, levels)
