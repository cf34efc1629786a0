"""Mutation testing of one kernel file against a targeted test selection (no external tool).

Each mutant is one small change of the kernel's syntax tree, of the kinds a one-line slip makes:

======================  ===========================================================
operator                change
======================  ===========================================================
``arith``               ``+ <-> -``, ``* <-> /``, ``** -> *`` (also in ``x op= y``)
``compare``             ``< <-> <=``, ``> <-> >=``, ``== <-> !=``
``constant``            a number c -> -c (0 -> 1)
``drop-term``           ``a + b`` / ``a - b`` -> ``a``
``negation``            ``-x`` -> ``x``
``boolean``             ``and <-> or``
``off-by-one``          ``range(.., n)`` -> ``range(.., n + 1)``; ``x[i]`` -> ``x[i + 1]``
                        for a constant index; a constant slice bound +1
======================  ===========================================================

Code inside ``raise`` statements, f-strings, docstrings and logging calls is not mutated (its
mutants would only change messages). The repository is copied once to a temporary directory; each
mutant is written into that copy only (the working tree is never modified), the selection is run
there with a timeout, and the copy is removed on any exit (an error, Ctrl-C, SIGTERM). A mutant is
*killed* when the selection fails, times out or crashes (the test process dies by a signal or a
fatal error: a mutant that makes compiled code read out of bounds), *survived* when it passes. The unmutated file
(after the same ``ast.unparse`` round trip) must pass first.

Usage (from the repository root)::

    python benchmarks/mutation.py nn_adapter/curvature/adam.py -- \\
        tests/nn_adapter/test_ddpnopt_reductions.py tests/nn_adapter/test_pinned_algorithms.py -k adam

Options: ``--timeout S`` per mutant (default: 3x the baseline run, at least 30 s), ``--list``
(print the mutants, run nothing), ``--only I,J`` (run those mutant indices), ``--json PATH``.

Measured (issue 13, 2 shared cores, about 7 s per mutant)::

    python benchmarks/mutation.py nn_adapter/curvature/adam.py -- nn_adapter/curvature/adam.py \
        tests/nn_adapter/test_ddpnopt_reductions.py tests/nn_adapter/test_pinned_algorithms.py \
        tests/nn_adapter/test_optim_conventions.py tests/nn_adapter/test_hardening_inputs.py \
        -k "adam or Adam or betas or amsgrad or eps"

- ``adam.py``: 49 of 52 killed (94%; 47 of 50 before its batched ``direction``). First run 46
  of 63 (73%): 8 survivors were a dead per-parameter ``param_update`` (removed), 4 the validation (now in the selection), 3 killed by
  new tests (the direction path with diagnostics, weight_decay=1). The 3 left are equivalent:
  ``betas[1] -> betas[-1]`` twice (a pair) and ``len(steps) != 1 -> != -1`` (always the
  per-parameter path, the same arithmetic).
- ``rmsprop.py`` (same files, ``-k "rmsprop or RMSprop or alpha or centered"``): 27 of 28 killed
  (96%); the survivor ``momentum > 0 -> >= 0`` in ``param_effective_gradient`` sends momentum 0
  through ``param_direction``, which computes the same -P (g + wd p).
- ``occore/solvers/ddp.py`` (68 of 94), ``occore/solvers/base.py`` (26 of 29),
  ``nn_adapter/curvature/ekfac.py`` (89 of 92), ``nn_adapter/curvature/kron.py`` (82 of 90):
  commands and survivors in the README's development notes.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", ".pytest_cache",
                                 "*.egg-info", "runs", "*.png")

_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
          ast.Pow: ast.Mult}
_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
           ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
           ast.NotEq: "!=", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    index: int
    line: int
    kind: str
    description: str
    outcome: str = ""          # "killed", "survived", "timeout", "crashed"
    seconds: float = 0.0


def _skipped_nodes(tree: ast.AST) -> set:
    """ids of nodes not to mutate: inside raise statements, f-strings, docstrings, logging."""
    skip = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            mark(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr in ("debug", "info", "warning", "error", "warn")):
            mark(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
                    getattr(node.body[0], "value", None), ast.Constant):
                mark(node.body[0])
    return skip


def _plus_one(expr: ast.expr) -> ast.expr:
    return ast.BinOp(left=expr, op=ast.Add(), right=ast.Constant(1))


def _sites(tree: ast.AST):
    """Yield ``(node, kind, description, apply)`` for every mutation site; ``apply(node)``
    mutates the node (of a copy of the tree) in place, or returns a replacement node."""
    skip = _skipped_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _ARITH:
            new = _ARITH[type(node.op)]
            desc = f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}"
            yield node, "arith", desc, (lambda n, new=new: setattr(n, "op", new()))
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
                yield node, "drop-term", f"a {_SYMBOL[type(node.op)]} b -> a", (lambda n: n.left)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE:
                    new = _COMPARE[type(op)]

                    def flip(n, i=i, new=new):
                        n.ops[i] = new()
                    yield node, "compare", f"{_SYMBOL[type(op)]} -> {_SYMBOL[new]}", flip
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            yield node, "boolean", f"{_SYMBOL[type(node.op)]} -> {_SYMBOL[new]}", (
                lambda n, new=new: setattr(n, "op", new()))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            yield node, "negation", "-x -> x", (lambda n: n.operand)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, (int, float))
              and not isinstance(node.value, bool)):
            new = 1 if node.value == 0 else -node.value
            yield node, "constant", f"{node.value!r} -> {new!r}", (
                lambda n, new=new: setattr(n, "value", new))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "range" and node.args):
            stop = 0 if len(node.args) == 1 else 1

            def longer(n, stop=stop):
                n.args[stop] = _plus_one(n.args[stop])
            yield node, "off-by-one", "range(.., n) -> range(.., n + 1)", longer
        elif isinstance(node, ast.Subscript):
            sl = node.slice
            if isinstance(sl, ast.Constant) and isinstance(sl.value, int) and not isinstance(
                    sl.value, bool):
                yield node, "off-by-one", f"[{sl.value}] -> [{sl.value + 1}]", (
                    lambda n: setattr(n.slice, "value", n.slice.value + 1))
            elif isinstance(sl, ast.Slice):
                for part in ("lower", "upper"):
                    if getattr(sl, part) is not None:
                        def shift(n, part=part):
                            setattr(n.slice, part, _plus_one(getattr(n.slice, part)))
                        yield node, "off-by-one", f"slice {part} bound + 1", shift


def _ordered_sites(tree: ast.AST) -> list:
    """:func:`_sites` in source order (stable: a copy of the tree gives the same order)."""
    return sorted(_sites(tree), key=lambda s: (getattr(s[0], "lineno", 0),
                                               getattr(s[0], "col_offset", 0)))


def mutants(source: str) -> tuple[list[Mutant], list[str]]:
    """The mutants of ``source`` and their mutated sources (after ``ast.unparse``)."""
    tree = ast.parse(source)
    found = _ordered_sites(tree)
    out, texts = [], []
    for i, (node, kind, desc, _) in enumerate(found):
        twin = copy.deepcopy(tree)
        # the i-th site of the copy is the same node, the copy's walk order being the same
        node2, _, _, apply2 = _ordered_sites(twin)[i]
        replacement = apply2(node2)
        if replacement is not None and replacement is not node2:
            _replace(twin, node2, replacement)
        ast.fix_missing_locations(twin)
        out.append(Mutant(i, getattr(node, "lineno", 0), kind, desc))
        texts.append(ast.unparse(twin))
    return out, texts


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for j, item in enumerate(value):
                    if item is old:
                        value[j] = new
                        return
    raise RuntimeError("mutation site not found")


class Sandbox:
    """A temporary copy of the repository, removed on any exit."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="occore-mutation-")
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        shutil.copytree(ROOT, self.path, ignore=_IGNORE, dirs_exist_ok=True, symlinks=True)

    def _on_signal(self, signum, frame):
        self.close()
        sys.exit(128 + signum)

    def close(self):
        if self.path and os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None

    def run(self, selection: list, timeout: float) -> tuple[str, float]:
        """``("passed" | "failed" | "timeout" | "crashed", seconds)`` of the selection in the copy
        (crashed: the test process died, a signal or a fatal error, e.g. a segfault in C)."""
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-p", "no:warnings", *selection]
        env = dict(os.environ, PYTHONPATH=self.path, PYTHONDONTWRITEBYTECODE="1")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=self.path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)       # the run's own process group only
            proc.communicate()
            return "timeout", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if proc.returncode == 5:
            raise SystemExit(f"the selection collected no tests: {' '.join(selection)}")
        if proc.returncode < 0 or b"Fatal Python error" in out:
            return "crashed", seconds                 # e.g. a segfault in compiled code
        if proc.returncode not in (0, 1):
            tail = out.decode(errors="replace").strip().splitlines()[-5:]
            if not any("failed" in line or "error" in line for line in tail):
                raise SystemExit("pytest could not run the selection:\n" + "\n".join(tail))
        return ("passed" if proc.returncode == 0 else "failed"), seconds


def main(argv=None) -> int:
    args, selection = _parse(argv)
    path = os.path.normpath(args.file)
    with open(os.path.join(ROOT, path)) as fh:
        original = fh.read()
    found, texts = mutants(original)
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        found = [m for m in found if m.index in keep]
    if args.list:
        for m in found:
            print(f"{m.index:4d}  line {m.line:4d}  {m.kind:10s}  {m.description}")
        return 0
    box = Sandbox()
    target = os.path.join(box.path, path)
    try:
        with open(target, "w") as fh:
            fh.write(ast.unparse(ast.parse(original)))
        status, base = box.run(selection, timeout=max(600.0, args.timeout or 0))
        if status != "passed":
            raise SystemExit(f"the selection does not pass on the unmutated {path}; fix that first")
        timeout = args.timeout or max(30.0, 3 * base)
        print(f"{path}: {len(found)} mutants; selection {' '.join(selection)}; baseline "
              f"{base:.1f} s, timeout {timeout:.0f} s", flush=True)
        for m in found:
            with open(target, "w") as fh:
                fh.write(texts[m.index])
            status, m.seconds = box.run(selection, timeout)
            m.outcome = {"passed": "survived", "failed": "killed"}.get(status, status)
            print(f"  {m.index:4d} line {m.line:4d} {m.kind:10s} {m.description:34s} "
                  f"{m.outcome} ({m.seconds:.1f} s)", flush=True)
    finally:
        box.close()
    killed = sum(m.outcome in ("killed", "timeout", "crashed") for m in found)
    survivors = [m for m in found if m.outcome == "survived"]
    rate = killed / len(found) if found else float("nan")
    print(f"\n{path}: killed {killed} of {len(found)} mutants ({100 * rate:.1f}%), "
          f"{len(survivors)} survived")
    for m in survivors:
        print(f"  survived: #{m.index} line {m.line}: {m.kind} {m.description}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"file": path, "selection": selection, "killed": killed,
                       "total": len(found), "mutants": [asdict(m) for m in found]}, fh, indent=1)
    return 0


def _parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: mutation.py FILE [--timeout S] [--list] [--only I,J] "
                         "[--json PATH] -- PYTEST-SELECTION...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="the kernel file, relative to the repository root")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per mutant")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--only", default="", help="comma-separated mutant indices to run")
    parser.add_argument("--json", default="", help="write the outcomes to this JSON file")
    args = parser.parse_args(argv[:cut])
    selection = argv[cut + 1:]
    if not selection:
        raise SystemExit("give the pytest selection after --")
    if not os.path.isfile(os.path.join(ROOT, args.file)):
        raise SystemExit(f"{args.file}: no such file under {ROOT}")
    return args, selection


if __name__ == "__main__":
    sys.exit(main())
