"""The ``occore`` command line (also ``python -m occore``).

    occore solve cartpole --solver ddp            per-iteration table, then the result's summary
    occore compare --problems all --solvers ddp,ilqr,emsa,ipopt --plot compare.png --json runs.json
    occore list                                   the problems and solvers known by name
    occore train --dataset digits ...             network training, delegated to ``nn_adapter.cli.main``
"""
from __future__ import annotations

import argparse
import sys

from .errors import OccoreError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from .comparison.runner import DEFAULT_SOLVERS
    from .derivatives import BACKENDS

    parser = argparse.ArgumentParser(prog="occore", description="Trajectory optimisation: DDP, iLQR, E-MSA, IPOPT.")
    sub = parser.add_subparsers(dest="command", metavar="{solve,compare,list,train}")
    sub.required = True

    p = sub.add_parser("solve", help="solve one problem, printing the per-iteration table and a summary")
    p.add_argument("problem", help="a reference problem name (see `occore list`) or a Python file defining problems")
    p.add_argument("--solver", default="ddp", help="ddp (default), ilqr, emsa, ipopt or a variant (see `occore list`)")
    p.add_argument("--backend", default="casadi", choices=BACKENDS, help="derivative backend of a reference problem")
    p.add_argument("--max-iter", type=int, default=None, metavar="N", help="iteration limit")
    p.add_argument("--quiet", action="store_true", help="print only the summary")

    c = sub.add_parser("compare", help="run several solvers on several problems and print one table")
    c.add_argument("--problems", default="all",
                   help="'all', comma-separated names, or Python files defining problems (default: all)")
    c.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                   help=f"comma-separated solver names (default: {','.join(DEFAULT_SOLVERS)})")
    c.add_argument("--backend", default="casadi", choices=BACKENDS, help="derivative backend of the reference problems")
    c.add_argument("--max-iter", type=int, default=None, metavar="N", help="iteration limit for every solver")
    c.add_argument("--repeat", type=int, default=1, metavar="N", help="solve each pair N times, keep the fastest")
    c.add_argument("--plot", metavar="FILE.png", help="draw cost minus best against iteration and wall time")
    c.add_argument("--json", metavar="FILE", help="write the raw records as JSON")
    c.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list the problems and solvers known by name")
    sub.add_parser("train", help="train networks through nn_adapter (options: occore train --help)")
    return parser


def _train(rest) -> int:
    try:
        from nn_adapter.cli import main as train_main
    except ImportError as err:
        raise OccoreError(f"occore train needs nn_adapter.cli ({err})") from err
    return int(train_main(rest) or 0)


def _solve(args, out) -> int:
    from .callbacks import Verbose, format_header, format_row
    from .comparison.problems import resolve_problems
    from .comparison.solvers import make_runner
    from .solvers.base import Solver

    if args.max_iter is not None and args.max_iter < 1:
        raise OccoreError(f"--max-iter {args.max_iter}: expected an integer >= 1")
    runner = make_runner(args.solver, args.max_iter)
    for name, prob in resolve_problems(args.problem, backend=args.backend).items():
        print(f"{name}: {prob!r}, solver {args.solver}", file=out)
        if isinstance(runner, Solver):
            res = runner.solve(prob, callbacks=[] if args.quiet else [Verbose(out)])
        else:
            res = runner.solve(prob)
            if not args.quiet and res.history:
                print(format_header(), file=out)
                for info in res.history:
                    print(format_row(info), file=out)
        print(res.summary(), file=out)
    return 0


def _compare(args, out) -> int:
    from .comparison.runner import compare

    cmp = compare(args.problems, args.solvers, max_iter=args.max_iter, backend=args.backend,
                  progress=not args.no_progress, repeat=args.repeat)
    print(cmp.table(markdown=args.markdown), file=out)
    for r in cmp.records:
        if r.status == "ERROR":
            print(f"{r.problem} / {r.solver}: {r.message}", file=out)
    if args.plot:
        cmp.plot(args.plot)
        print(f"plot written to {args.plot}", file=out)
    if args.json:
        cmp.to_json(args.json)
        print(f"records written to {args.json}", file=out)
    return 0


def _list(out) -> int:
    from .comparison.solvers import describe
    from .problems import NAMES, OPTIMA

    print("problems (J* from REFERENCE.md):", file=out)
    for name in NAMES:
        print(f"  {name:<14} {OPTIMA[name]:.10g}", file=out)
    print("solvers:", file=out)
    print(describe(), file=out)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``occore`` console script; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:       # everything after "train" belongs to nn_adapter's parser
        try:
            return _train(argv[1:])
        except OccoreError as err:
            print(f"occore: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "solve":
            return _solve(args, out)
        if args.command == "compare":
            return _compare(args, out)
        return _list(out)
    except OccoreError as err:
        print(f"occore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("occore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # pragma: no cover - e.g. `occore list | head`
        sys.stdout = None
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
