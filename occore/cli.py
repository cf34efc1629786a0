"""The ``occore`` command line (also ``python -m occore``).

    occore solve cartpole --solver ddp            per-iteration table, then the result's summary
    occore compare --problems all --solvers ddp,ilqr,emsa,ipopt --plot compare.png --json runs.json
    occore list                                   the problems and solvers known by name
    occore mpc pendulum --x0 0.5,-1 --plot mpc.png  receding-horizon control in closed loop
    occore train --dataset digits ...             network training, a plugin command (below)

Plugin commands. Other packages add commands through the entry-point group ``occore.commands``
(:data:`PLUGIN_GROUP`): the entry point's name is the command, its value names either a
:class:`Command` (help text and main) or a plain ``main(argv) -> int``. The ``train`` command is
declared so by nn_adapter in ``pyproject.toml``::

    [project.entry-points."occore.commands"]
    train = "nn_adapter.cli:COMMAND"

Discovery reads the installed metadata only; a plugin is imported when its command runs (every
argument after the command name is handed to its main) or when ``occore --help`` asks for its help
text, so ``occore solve`` and :func:`build_parser` never import a plugin. A plugin that fails to
import is a one-line error naming it (exit status 2). Plugin names that clash with a built-in
command are ignored.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import OccoreError

__all__ = ["main", "build_parser", "Command", "PLUGIN_GROUP", "plugin_commands"]

PLUGIN_GROUP = "occore.commands"
BUILTIN_COMMANDS = ("solve", "compare", "list", "mpc")


@dataclass(frozen=True)
class Command:
    """A plugin command, the object an ``occore.commands`` entry point names.

    Attributes:
        help: one line for ``occore --help``.
        main: ``main(argv) -> int``, called with every argument after the command name; returns the
            exit status (2 on bad input, as for the built-in commands).

    Example:
        >>> Command("say hello", lambda argv: 0).main(["--loud"])
        0
    """

    help: str
    main: Callable[[Sequence[str]], int]


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group=PLUGIN_GROUP)


def plugin_commands() -> dict:
    """The installed plugin commands, ``{name: importlib.metadata.EntryPoint}``, without importing them.

    The first entry point of a name wins (an editable install may list its metadata twice); names of
    built-in commands are skipped.
    """
    found = {}
    for ep in _entry_points():
        if ep.name not in BUILTIN_COMMANDS and ep.name not in found:
            found[ep.name] = ep
    return found


def _load(name: str, ep) -> Command:
    """Import the plugin behind ``ep``; an :class:`OccoreError` naming it when that fails."""
    try:
        obj = ep.load()
    except Exception as err:  # any failure of a third-party import is the plugin's, reported in one line
        detail = str(err).splitlines()[0] if str(err) else ""
        raise OccoreError(f"plugin command '{name}' ({ep.value}) failed to load: "
                          f"{type(err).__name__}{': ' + detail if detail else ''}") from err
    if isinstance(obj, Command):
        return obj
    if callable(obj):
        doc = (getattr(obj, "__doc__", None) or "").strip()
        return Command(doc.splitlines()[0] if doc else f"provided by {ep.value}", obj)
    raise OccoreError(f"plugin command '{name}' ({ep.value}) is neither an occore.cli.Command nor callable")


def _plugin_help(name: str, ep, describe: bool) -> str:
    if describe:
        try:
            return _load(name, ep).help
        except OccoreError as err:
            return f"(unavailable: {err})"
    return f"provided by {ep.module} (options: occore {name} --help)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line on stderr (exit status 2), for every
    command of the project (``occore``, ``occore train``, the benchmark scripts).

    Example:
        >>> p = OneLineParser(prog="demo")
        >>> _ = p.add_argument("--n", type=int)
        >>> p.parse_args(["--n", "x"])
        Traceback (most recent call last):
        SystemExit: 2
    """

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_counts(args) -> None:
    """The integer options are >= 1 (checked before any work)."""
    for option in ("max_iter", "repeat", "workers"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise OccoreError(f"--{option.replace('_', '-')} {value}: expected an integer >= 1")


def _check_outputs(args) -> None:
    """--plot and --json (where the command has them) are checked, and matplotlib looked for,
    before the first solve."""
    from .output_paths import check_outputs

    check_outputs(getattr(args, "plot", None), getattr(args, "json", None))


def build_parser(plugins: dict | None = None, describe_plugins: bool = False) -> argparse.ArgumentParser:
    """The top-level parser: the built-in commands, then one entry per plugin command.

    Args:
        plugins: ``{name: EntryPoint}`` (default: :func:`plugin_commands`).
        describe_plugins: import the plugins to show their own help text (for ``occore --help``);
            otherwise no plugin is imported and the help line names the providing module.
    """
    from .comparison.runner import DEFAULT_SOLVERS
    from .derivatives import BACKENDS

    plugins = plugin_commands() if plugins is None else plugins
    names = list(BUILTIN_COMMANDS) + list(plugins)
    from . import __version__

    parser = OneLineParser(prog="occore", description="Trajectory optimisation: DDP, iLQR, FDDP, constrained DDP (CDDP), E-MSA, MPC; IPOPT and FATROP as references.")
    parser.add_argument("--version", action="version", version=f"occore {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(names) + "}", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser("solve", help="solve one problem, printing the per-iteration table and a summary")
    p.add_argument("problem", help="a reference problem name (see: occore list) or a Python file defining problems")
    p.add_argument("--solver", default="ddp", help="ddp (default), ilqr, emsa, ipopt or a variant (see: occore list)")
    p.add_argument("--backend", default="casadi", choices=BACKENDS, help="derivative backend of a reference problem")
    p.add_argument("--max-iter", type=int, default=None, metavar="N", help="iteration limit (>= 1)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")

    c = sub.add_parser("compare", help="run several solvers on several problems and print one table")
    c.add_argument("--problems", default="all",
                   help="'all', comma-separated names, or Python files defining problems (default: all)")
    c.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                   help=f"comma-separated solver names (default: {','.join(DEFAULT_SOLVERS)})")
    c.add_argument("--backend", default="casadi", choices=BACKENDS, help="derivative backend of the reference problems")
    c.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help="iteration limit for every solver (>= 1)")
    c.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="solve each pair N times, keep the fastest")
    c.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the (problem, solver) pairs in N processes (same table as serial, times aside)")
    c.add_argument("--plot", metavar="FILE.png",
                   help="draw cost minus best against iteration and wall time (needs matplotlib)")
    c.add_argument("--json", metavar="FILE", help="write the raw records as JSON")
    c.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("list", help="list the problems and solvers known by name")

    m = sub.add_parser("mpc", help="receding-horizon control of a problem in closed loop (its own dynamics as the plant)")
    m.add_argument("problem", help="a reference problem name (see: occore list) or a Python file defining one problem")
    m.add_argument("--solver", default="ilqr", help="the solver re-solving at each step: ilqr (default), ddp, fddp, cddp")
    m.add_argument("--steps", type=int, default=150, metavar="N", help="closed-loop steps (default 150)")
    m.add_argument("--iterations", type=int, default=None, metavar="K",
                   help="solver iterations per step (real-time iteration); default: solve to convergence")
    m.add_argument("--x0", default=None, metavar="X", help="initial state, comma-separated (default: the problem's)")
    m.add_argument("--backend", default="casadi", choices=BACKENDS, help="derivative backend of a reference problem")
    m.add_argument("--plot", metavar="FILE.png", help="draw the closed-loop states and controls")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, ep in plugins.items():   # parsed by the plugin itself: main() hands it the arguments
        sub.add_parser(name, help=_plugin_help(name, ep, describe_plugins).replace("%", "%%"), add_help=False)
    return parser


def _run_plugin(name: str, ep, rest) -> int:
    return int(_load(name, ep).main(list(rest)) or 0)


def _solve(args, out) -> int:
    from .callbacks import Verbose, format_header, format_row
    from .comparison.problems import resolve_problems
    from .comparison.solvers import make_runner
    from .solvers.base import Solver

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

    _check_outputs(args)
    cmp = compare(args.problems, args.solvers, max_iter=args.max_iter, backend=args.backend,
                  progress=not args.no_progress, repeat=args.repeat, workers=args.workers)
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


def _mpc(args, out) -> int:
    import numpy as np

    from .comparison.problems import resolve_problems
    from .comparison.runner import _progress
    from .comparison.solvers import make_runner
    from .mpc import MPC, plot_closed_loop, simulate
    from .problems import GOALS
    from .solvers.base import Solver

    if args.steps < 1:
        raise OccoreError(f"--steps {args.steps}: expected an integer >= 1")
    if args.iterations is not None and args.iterations < 1:
        raise OccoreError(f"--iterations {args.iterations}: expected an integer >= 1")
    _check_outputs(args)
    problems = resolve_problems(args.problem, backend=args.backend)
    if len(problems) != 1:
        raise OccoreError(f"mpc: expected one problem, got {len(problems)} ({', '.join(problems)})")
    (name, prob), = problems.items()
    solver = make_runner(args.solver)
    if not isinstance(solver, Solver):
        raise OccoreError(f"--solver {args.solver}: mpc needs an occore solver (ilqr, ddp, fddp, cddp, ...)")
    x0 = prob.x0
    if args.x0 is not None:
        try:
            x0 = [float(v) for v in args.x0.split(",")]
        except ValueError:
            raise OccoreError(f"--x0 {args.x0!r}: expected {prob.nx} comma-separated numbers") from None
        if len(x0) != prob.nx:
            raise OccoreError(f"--x0 {args.x0!r}: expected {prob.nx} comma-separated numbers, got {len(x0)}")
        if not all(math.isfinite(v) for v in x0):
            raise OccoreError(f"--x0 {args.x0!r}: expected finite numbers")
    mpc = MPC(prob, solver, iterations=args.iterations)
    bar = _progress(args.steps, not args.no_progress, unit="step")

    def plant(x, u):          # counts the steps outside the controller's timed call
        x_next = prob.transition(x, u)
        bar.update(1)
        return x_next
    try:
        run = simulate(mpc, plant, args.steps, x0=x0)
    finally:
        bar.close()
    print(f"{name}: {prob!r}, solver {args.solver}, "
          f"{'to convergence' if args.iterations is None else f'{args.iterations} iterations'} per step", file=out)
    print(f"  x0      {np.array2string(np.asarray(x0, dtype=float), precision=4)}", file=out)
    print(f"  x_final {np.array2string(run.xs[-1], precision=4)} after {args.steps} steps", file=out)
    if name in GOALS:
        print(f"  distance to the goal {float(np.max(np.abs(run.xs[-1] - np.array(GOALS[name])))):.3e} (max norm)",
              file=out)
    print(f"  latency per step: median {run.latency(50) * 1e3:.3f} ms, p99 {run.latency(99) * 1e3:.3f} ms, "
          f"max {run.latencies.max() * 1e3:.3f} ms", file=out)
    if args.plot:
        plot_closed_loop(run, args.plot, title=f"{name}: MPC with {args.solver}",
                         goal=GOALS.get(name))
        print(f"plot written to {args.plot}", file=out)
    return 0


def _list(out) -> int:
    from .comparison.solvers import describe
    from .problems import CONSTRAINED, NAMES, OPTIMA

    print("problems (J* from REFERENCE.md):", file=out)
    for name in NAMES:
        print(f"  {name:<14} {OPTIMA[name]:.10g}", file=out)
    print("constrained problems (J* from occore.reference.ipopt; `--problems constrained`):", file=out)
    for name in CONSTRAINED:
        print(f"  {name:<18} {OPTIMA[name]:.10g}", file=out)
    print("solvers:", file=out)
    print(describe(), file=out)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``occore`` console script; returns the exit status (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        plugins = plugin_commands()
        if argv[:1] and argv[0] in plugins:     # everything after the name belongs to the plugin's parser
            return _run_plugin(argv[0], plugins[argv[0]], argv[1:])
    except OccoreError as err:
        print(f"occore: error: {err}", file=sys.stderr)
        return 2
    args = build_parser(plugins, describe_plugins=argv[:1] in (["-h"], ["--help"])).parse_args(argv)
    out = sys.stdout
    try:
        _check_counts(args)
        if args.command == "solve":
            return _solve(args, out)
        if args.command == "compare":
            return _compare(args, out)
        if args.command == "list":
            return _list(out)
        if args.command == "mpc":
            return _mpc(args, out)
        raise OccoreError(f"unknown command {args.command!r}")   # a plugin command reaches its main first
    except OccoreError as err:
        print(f"occore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("occore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # pragma: no cover - e.g. `occore list | head`
        sys.stdout = None
        return 0


if __name__ == "__main__":  # pragma: no cover - `python -m occore.cli`: the module occore.cli itself,
    from occore.cli import main as _main   # so that plugins see the same Command class

    sys.exit(_main())
