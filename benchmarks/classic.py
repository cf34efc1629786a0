"""occore's solvers on the reference problems, beside CasADi + IPOPT and CasADi + FATROP in the same run.

The classic set (REFERENCE.md): iLQR, DDP, FDDP from the zero-control guess and FDDP from the linear
interpolation x0 -> goal as state guess (``fddp-xs0``), and both with ``FDDP(rollout="linear")``
(``fddp-lin``, ``fddp-lin-xs0``: the multiple-shooting step that keeps the gaps open). The constrained set (occore.problems.CONSTRAINED):
CDDP. Every entry from the same initial controls (zeros).

    python benchmarks/classic.py                    # table + linear-growth check + profile
    python benchmarks/classic.py --repeats 9 --problems cartpole,pendulum_box
    python benchmarks/classic.py --no-profile --no-long
    python benchmarks/classic.py --torch-only          # the torch backend beside CasADi, per iteration

Solve times are medians of ``--repeats`` warm runs (each problem is built and each solver run once
before timing); the runs of DDP, iLQR and IPOPT alternate, so that machine noise hits all of them
alike. IPOPT's time is that of the solver call (``occore.reference.ipopt(..., record=False)``,
``Result.wall_time``), excluding the NLP's transcription, just as occore's times exclude building
the problem's CasADi functions. The ratio columns are solve time / IPOPT's (FATROP's) solve time
(< 1: faster). Targets: <= 2x IPOPT on the classic set, cost per iteration linear in T; CDDP faster
than IPOPT on every constrained problem; no slower than FATROP on the classic set.

The torch table times the same solves with ``backend="torch"`` (compiled by inductor,
``backend_options={"compile": "always"}``; compilation is done before timing and reported as
setup) beside CasADi, alternating, and the eager torch backend (one run, ``"compile": "never"``).
The issue asks for torch / CasADi <= 5 per iteration.

Single-threaded: set OMP_NUM_THREADS=1 (done below before numpy is imported).
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import occore  # noqa: E402
from occore.lq import compiled, csweep  # noqa: E402
from occore.cli import OneLineParser  # noqa: E402


def _nlp(name: str):
    """Timed run of the CasADi reference ``name`` (IPOPT or FATROP): its solver call only."""
    try:
        from occore import reference
    except ImportError as err:  # the reference is developed in parallel; say so rather than fail
        raise SystemExit(f"occore.reference is not importable ({err})") from err
    solve = getattr(reference, name)
    kw = {"record": False} if name == "ipopt" else {}

    def run(problem, _name):
        with _quiet_gc():
            res = solve(problem, **kw)
        return res, res.wall_time
    return run


class _quiet_gc:
    """Collect garbage before a timed run and pause the collector during it (as ``timeit`` does):
    the references build CasADi objects on every call, whose collection would otherwise land in
    whichever run happens to come next."""

    def __enter__(self):
        gc.collect()
        gc.disable()

    def __exit__(self, *exc):
        gc.enable()


def _occore(cls, interpolate: bool = False, **options):
    """Timed run of an occore solver from the zero-control guess (``interpolate``: FDDP from the
    linear interpolation x0 -> goal as state guess, built outside the timing), with ``options``."""
    def run(problem, name):
        kw = {}
        if interpolate:
            kw["xs0"] = np.linspace(problem.x0, occore.problems.GOALS[name], problem.horizon + 1)
        solver = cls(**options)
        with _quiet_gc():
            t0 = time.perf_counter()
            res = solver.solve(problem, **kw)
            seconds = time.perf_counter() - t0
        return res, seconds
    return run


#: what the table can put side by side: name -> timed run (problem, problem name) -> (Result, seconds)
RUNS = {"ilqr": _occore(occore.ILQR), "ddp": _occore(occore.DDP), "fddp": _occore(occore.FDDP),
        "fddp-xs0": _occore(occore.FDDP, interpolate=True), "cddp": _occore(occore.CDDP),
        "fddp-lin": _occore(occore.FDDP, rollout="linear"),
        "fddp-lin-xs0": _occore(occore.FDDP, interpolate=True, rollout="linear"),
        "ipopt": _nlp("ipopt"), "fatrop": _nlp("fatrop")}
#: the entries of the classic set (REFERENCE.md) and of the constrained problems
CLASSIC = ("ilqr", "ddp", "fddp", "fddp-xs0", "fddp-lin", "fddp-lin-xs0", "ipopt", "fatrop")
CONSTRAINED = ("cddp", "ipopt", "fatrop")
REFERENCES = ("ipopt", "fatrop")


def _time_runs(problems, entries, repeats: int):
    """Warm runs of ``entries`` on each (name, problem), alternating over entries and problems, so
    that changes in the machine's load hit every entry alike. Returns, per problem,
    {entry: (Result, [seconds])}."""
    runs = []
    for name, problem in problems:   # warm-up
        runs.append({e: (RUNS[e](problem, name)[0], []) for e in entries})
    for _ in range(repeats):
        for (name, problem), r in zip(problems, runs):
            for e in entries:
                res, seconds = RUNS[e](problem, name)
                r[e] = (res, r[e][1] + [seconds])
    return runs


def _row(problem_name, T, solver, res, seconds, refs, optimum):
    t = statistics.median(seconds)
    per = t / max(res.iterations, 1)
    gap = (res.cost - optimum) / abs(optimum) if optimum else float("nan")
    ratios = {ref: (t / ref_t if solver not in REFERENCES else float("nan")) for ref, ref_t in refs.items()}
    return dict(problem=problem_name, T=T, solver=solver, status=res.status.name, iterations=res.iterations,
                cost=res.cost, gap=gap, violation=getattr(res, "constraint_violation", 0.0), ms=1e3 * t,
                ms_per_iter=1e3 * per, ratio=ratios.get("ipopt", float("nan")),
                ratio_fatrop=ratios.get("fatrop", float("nan")))


def _print_table(rows):
    head = (f"{'problem':<18} {'T':>5} {'solver':<12} {'status':<10} {'iter':>5} {'cost':>20} "
            f"{'rel. gap':>9} {'viol':>8} {'solve ms':>9} {'ms/iter':>8} {'/ IPOPT':>8} {'/ FATROP':>8}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r["problem"], r["T"]) != last:
            print()
        last = (r["problem"], r["T"])

        def ratio(x):
            return "" if x != x else f"{x:.2f}x"
        print(f"{r['problem']:<18} {r['T']:>5} {r['solver']:<12} {r['status']:<10} {r['iterations']:>5} "
              f"{r['cost']:>20.14g} {r['gap']:>9.1e} {r['violation']:>8.1e} {r['ms']:>9.2f} "
              f"{r['ms_per_iter']:>8.3f} {ratio(r['ratio']):>8} {ratio(r['ratio_fatrop']):>8}")


def benchmark(names, repeats):
    """Returns the table rows and, per problem, the one-off setup times excluded from the solve times:
    building the occore Problem (CasADi functions) and IPOPT's transcription."""
    rows, setup = [], {}
    occore.problems.make("lqr")   # imports casadi, so that the setup times below exclude it
    for name in names:
        t0 = time.perf_counter()
        prob = occore.problems.make(name)
        build = time.perf_counter() - t0
        entries = CONSTRAINED if prob.constraint_kinds else CLASSIC
        runs = _time_runs([(name, prob)], entries, repeats)[0]
        refs = {ref: statistics.median(runs[ref][1]) for ref in REFERENCES}
        optimum = occore.problems.OPTIMA[name]
        for solver in entries:
            res, secs = runs[solver]
            rows.append(_row(name, prob.horizon, solver, res, secs, refs, optimum))
        setup[name] = (1e3 * build, runs["ipopt"][0].message.rsplit("transcription", 1)[-1].strip())
    return rows, setup


GROWTH = ("ilqr", "ddp", "ipopt")


def long_horizon(repeats, horizons=(100, 1000)):
    """Pendulum at several horizons: time per iteration should grow (at most) linearly in T. The gap
    column is relative to the best cost any of the three solvers reached at that T."""
    rows = []
    probs = [("pendulum", occore.problems.make("pendulum", horizon=T)) for T in horizons]
    for T, runs in zip(horizons, _time_runs(probs, GROWTH, repeats)):
        refs = {"ipopt": statistics.median(runs["ipopt"][1])}
        best = min(res.cost for res, _ in runs.values() if np.isfinite(res.cost))
        for solver in GROWTH:
            res, secs = runs[solver]
            rows.append(_row("pendulum", T, solver, res, secs, refs, best))
    return rows


def _print_growth(rows):
    """Time per iteration = a + b T through the shortest and longest horizon: b is the marginal cost of
    a stage, a the fixed cost of an iteration (Python, calls); linear growth means b dominates."""
    for solver in GROWTH:
        mine = [r for r in rows if r["solver"] == solver]
        lo, hi = mine[0], mine[-1]
        b = (hi["ms_per_iter"] - lo["ms_per_iter"]) / (hi["T"] - lo["T"])
        a = lo["ms_per_iter"] - b * lo["T"]
        steps = ", ".join(f"T={r['T']}: {1e3 * r['ms_per_iter'] / r['T']:.2f}" for r in mine)
        print(f"  {solver:<6} per iteration {hi['ms_per_iter'] / lo['ms_per_iter']:5.1f}x for {hi['T'] / lo['T']:.0f}x T; "
              f"us per stage and iteration {steps}; fit {1e3 * a:.0f} us + {1e3 * b:.2f} us * T")


class _Timed:
    """Accumulates the time spent in a wrapped callable."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def profile(name="cartpole", solver_name="ilqr", repeats=5):
    """Where the time of one iteration goes: derivatives, backward sweep, rollouts, the rest."""
    prob = occore.problems.make(name)
    solver = {"ilqr": occore.ILQR, "ddp": occore.DDP, "fddp": occore.FDDP}[solver_name]()
    solver.solve(prob)
    sweep = compiled.best_sweep()
    timers = dict(derivatives=_Timed(prob.evaluate_derivatives), sweep=_Timed(sweep),
                  rollouts=_Timed(prob.rollout_policy))
    prob.evaluate_derivatives = timers["derivatives"]
    prob.rollout_policy = timers["rollouts"]
    prob._sweep = lambda: timers["sweep"]
    total, iterations = 0.0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = solver.solve(prob)
        total += time.perf_counter() - t0
        iterations += res.iterations
    per = 1e6 / iterations
    print(f"\nProfile: {solver_name} on {name} (T={prob.horizon}), {iterations // repeats} iterations, "
          f"{1e3 * total / repeats:.1f} ms per solve, {per * total:.0f} us per iteration; "
          f"sweep: {'C (occore/lq/_sweep.c)' if sweep is csweep.riccati_sweep else 'numpy'}")
    accounted = 0.0
    for key, tm in timers.items():
        accounted += tm.seconds
        print(f"  {key:<12} {per * tm.seconds:7.1f} us/iter  {100 * tm.seconds / total:5.1f} %  "
              f"({tm.calls / iterations:.2f} calls/iter, {1e6 * tm.seconds / max(tm.calls, 1):.1f} us/call)")
    rest = total - accounted
    print(f"  {'the rest':<12} {per * rest:7.1f} us/iter  {100 * rest / total:5.1f} %  "
          "(solver loop, Policy/Trajectory/IterationInfo, local-model wrapper, history)")


TORCH_SOLVERS = {"ilqr": occore.ILQR, "ddp": occore.DDP}


def torch_table(names, repeats):
    """Time per iteration of iLQR and DDP with the compiled torch backend beside CasADi (medians of
    alternating warm runs), the eager torch backend (one run) and the one-off compile time."""
    import torch

    torch.set_num_threads(1)
    head = (f"{'problem':<13} {'solver':<6} {'iter c/t':>9} {'casadi ms/it':>12} {'torch ms/it':>11} "
            f"{'ratio':>6} {'eager ms/it':>11} {'eager ratio':>11} {'compile s':>9}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name in names:
        pc = occore.problems.make(name)
        t0 = time.perf_counter()
        pt = occore.problems.make(name, backend="torch", backend_options={"compile": "always"})
        for cls in TORCH_SOLVERS.values():    # compiles (derivatives, both rollouts) and warms up
            cls().solve(pt)
        compile_s = time.perf_counter() - t0
        pe = occore.problems.make(name, backend="torch", backend_options={"compile": "never"})
        for sname, cls in TORCH_SOLVERS.items():
            per = {"casadi": [], "torch": []}
            iters = {}
            for _ in range(repeats):
                for key, prob in (("casadi", pc), ("torch", pt)):
                    t0 = time.perf_counter()
                    res = cls().solve(prob)
                    per[key].append((time.perf_counter() - t0) / max(res.iterations, 1))
                    iters[key] = res.iterations
            t0 = time.perf_counter()
            eager = cls().solve(pe)
            eager_per = (time.perf_counter() - t0) / max(eager.iterations, 1)
            c, t = statistics.median(per["casadi"]), statistics.median(per["torch"])
            worst = max(worst, t / c)
            print(f"{name:<13} {sname:<6} {iters['casadi']:>4}/{iters['torch']:<4} {1e3 * c:>12.3f} "
                  f"{1e3 * t:>11.3f} {t / c:>5.1f}x {1e3 * eager_per:>11.2f} {eager_per / c:>10.0f}x "
                  f"{compile_s:>9.1f}")
    print(f"\nworst torch (compiled) / CasADi per iteration: {worst:.1f}x (target <= 5x)")


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="all",
                    help="comma-separated names, 'classic', 'constrained' or 'all' (both sets)")
    ap.add_argument("--repeats", type=int, default=5, help="timed warm runs per solver (median)")
    ap.add_argument("--no-long", action="store_true", help="skip the long-horizon pendulum")
    ap.add_argument("--horizons", default="100,1000", help="pendulum horizons of the growth check")
    ap.add_argument("--no-profile", action="store_true", help="skip the cart-pole profile")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend table")
    ap.add_argument("--torch-only", action="store_true", help="only the torch backend table")
    args = ap.parse_args(argv)
    groups = {"all": occore.problems.NAMES + occore.problems.CONSTRAINED, "classic": occore.problems.NAMES,
              "constrained": occore.problems.CONSTRAINED}
    names = groups.get(args.problems) or tuple(n.strip() for n in args.problems.split(","))
    unknown = [n for n in names if n not in groups["all"]]
    if unknown:
        ap.error(f"--problems: unknown problem(s) {unknown}; valid: all, classic, constrained, "
                 f"{', '.join(groups['all'])}")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: expected an integer >= 1")
    if args.no_torch and args.torch_only:
        ap.error("--no-torch and --torch-only exclude each other")
    try:
        horizons = tuple(int(t) for t in args.horizons.split(","))
    except ValueError:
        horizons = ()
    if not horizons or min(horizons) < 1:
        ap.error(f"--horizons {args.horizons!r}: expected comma-separated integers >= 1")

    print(f"occore backward sweep: {'C' if compiled.compiled_available() else 'numpy (C unavailable)'}; "
          f"numpy {np.__version__}; median of {args.repeats} warm runs; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}\n")
    if not args.no_torch:
        print("Torch backend beside CasADi (time per iteration):\n")
        torch_table([n for n in names if n in occore.problems.NAMES], args.repeats)   # unconstrained
        print()
        if args.torch_only:
            return
    rows, setup = benchmark(names, args.repeats)
    _print_table(rows)
    print("\nOne-off setup, not in the solve times: " + "; ".join(
        f"{name} occore {ms:.0f} ms, IPOPT {ipopt_ms}" for name, (ms, ipopt_ms) in setup.items()))
    print()
    for solver in dict.fromkeys(r["solver"] for r in rows if r["solver"] not in REFERENCES):
        mine = [r for r in rows if r["solver"] == solver]
        print(f"{solver:<12} worst ratio to IPOPT {max(r['ratio'] for r in mine):.2f}x, to FATROP "
              f"{max(r['ratio_fatrop'] for r in mine):.2f}x; worst rel. gap {max(abs(r['gap']) for r in mine):.1e}, "
              f"worst violation {max(r['violation'] for r in mine):.1e} over {len(mine)} problems")

    if not args.no_long:
        print(f"\nGrowth in T (pendulum, horizons {', '.join(map(str, horizons))}; gap relative to the best "
              "cost at that T):\n")
        long_rows = long_horizon(max(3, args.repeats // 2), horizons)
        _print_table(long_rows)
        print()
        _print_growth(long_rows)
    if not args.no_profile:
        profile("cartpole", "ilqr", args.repeats)
        profile("cartpole", "ddp", args.repeats)
        profile("cartpole", "fddp", args.repeats)


if __name__ == "__main__":
    main()
