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

C kernels (a FILE ending in ``.c``; today ``occore/lq/_sweep.c``, see ``C_KERNELS``): the mutants
are textual, one token of a tokenised source replaced: ``arith`` (binary ``+ <-> -``, ``* <-> /``,
``+= <-> -=``, ``*= <-> /=``), ``compare``, ``constant`` (c -> ``(-c)``, 0 -> 1), ``negation``
(unary ``-`` dropped), ``boolean`` (``&& <-> ||``) and ``off-by-one`` (a constant index ``[k]``
-> ``[k+1]``; loop bounds ``i < n`` -> ``i <= n`` are compare mutants); no ``drop-term`` (it
needs the extent of an operand). Comments, string and character literals and preprocessor lines
(``#define`` constants included) are left alone. ``*``, ``-`` and ``+`` count as binary only after
an operand (a number, a variable, ``)`` or ``]``), so that a pointer declarator (``double *A``,
``const double *a, *b``), a dereference (``*p = 0``) or a cast (``(double *)``) is never mutated;
a name ending in ``_t`` or a C keyword is a type, not an operand. Mutants that repeat an earlier
mutant's text (``-2``: negation and constant) are dropped. For each mutant (and the unmutated
baseline) the extensions of the copy are rebuilt (``setup.py -q build_ext --inplace --force``,
after removing the old library and ``build/``); a mutant that does not build is *stillborn*. The
selection then runs with a pytest plugin (written into the copy) that stops it, again as
*stillborn*, unless the kernel's loader (``occore.lq.csweep``) has loaded the copy's library, built
from the mutated source (its built-in source hash checked by the loader): no test runs on the numpy
fallback or a stale library. Stillborn mutants are not counted in the rate.

Usage (from the repository root)::

    python benchmarks/mutation.py nn_adapter/curvature/adam.py -- \\
        tests/nn_adapter/test_ddpnopt_reductions.py tests/nn_adapter/test_pinned_algorithms.py -k adam
    python benchmarks/mutation.py occore/lq/_sweep.c -- tests/occore/test_csweep.py \\
        tests/occore/test_hardening_algorithms.py tests/occore/test_fddp.py

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
- ``occore/lq/_sweep.c`` (C mode, the second command of the usage above, about 4 s a mutant with
  its rebuild): 742 of 829 killed (89.5%; one more mutant stillborn: the ABI number, refused by the
  loader), then 750 of 829 (90.5%) with tests added to ``tests/occore/test_csweep.py``; the 79 left
  (one past a loop's end into dead workspace, box-QP stopping rules and ties, malloc failures)
  are classified in the README's development notes.
- ``occore/solvers/ddp.py`` (68 of 94), ``occore/solvers/base.py`` (26 of 29),
  ``nn_adapter/curvature/ekfac.py`` (89 of 92), ``nn_adapter/curvature/kron.py`` (82 of 90):
  commands and survivors in the README's development notes.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import copy
import glob
import importlib.machinery
import json
import os
import re
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
    outcome: str = ""          # "killed", "survived", "timeout", "crashed" ("stillborn": C only)
    seconds: float = 0.0
    column: int = 0            # C mutants: the column (1-based) of the changed token


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


# --- C kernels: textual mutants from a token stream -------------------------------------------

_C_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\f\v]+|\n)
  | (?P<comment>/\*.*?\*/|//[^\n]*)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<number>0[xX][0-9a-fA-F]+[uUlL]*|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uUlLfF]*)
  | (?P<name>[A-Za-z_]\w*)
  | (?P<punct>\.\.\.|<<=|>>=|->|\+\+|--|<=|>=|==|!=|&&|\|\||[-+*/%&|^]=|<<|>>|\S)
""", re.S | re.X)

# words after which ``*`` / ``-`` / ``+`` cannot be binary: keywords and type names
_C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern
    float for goto if inline int long register restrict return short signed sizeof static struct
    switch typedef union unsigned void volatile while _Bool""".split())
_C_ARITH = {"+": "-", "-": "+", "*": "/", "/": "*", "+=": "-=", "-=": "+=", "*=": "/=", "/=": "*="}
_C_COMPARE = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
_C_BOOLEAN = {"&&": "||", "||": "&&"}


@dataclass
class CToken:
    kind: str      # ws, comment, string, preprocessor, number, name, punct
    text: str
    start: int     # offset in the source
    line: int
    column: int    # 1-based


def c_tokens(source: str) -> list[CToken]:
    """The tokens of a C source, whitespace, comments and string literals included (their texts
    joined give the source back). A line whose first token is ``#`` is one ``preprocessor`` token
    (with its backslash continuations)."""
    out, pos, line, line_start, at_line_start = [], 0, 1, 0, True
    while pos < len(source):
        col = pos - line_start + 1
        if at_line_start and source[pos] == "#":
            end = pos
            while True:
                nl = source.find("\n", end)
                end = len(source) if nl < 0 else nl
                if end > pos and source[end - 1] == "\\" and nl >= 0:
                    end += 1
                    continue
                break
            kind, text = "preprocessor", source[pos:end]
        else:
            m = _C_TOKEN.match(source, pos)
            kind, text = m.lastgroup, m.group()
        out.append(CToken(kind, text, pos, line, col))
        newlines = text.count("\n")
        if newlines:
            line += newlines
            line_start = pos + text.rindex("\n") + 1
        if kind == "ws" and text == "\n":
            at_line_start = True
        elif kind not in ("ws", "comment"):
            at_line_start = False
        pos += len(text)
    return out


def _operand_end(tok: CToken | None) -> bool:
    """Whether an operand can end with ``tok`` (then a following ``*`` / ``-`` is binary): a
    number, a variable (not a keyword or a ``*_t`` type name), ``)`` or ``]``. After a type, a
    comma, ``(``, ``=``, ``return`` ... a ``*`` is a pointer declarator or a dereference."""
    if tok is None:
        return False
    if tok.kind == "number":
        return True
    if tok.kind == "name":
        return tok.text not in _C_KEYWORDS and not tok.text.endswith("_t")
    return tok.kind == "punct" and tok.text in (")", "]")


def _c_negated(text: str) -> str:
    """A C literal's mutant: 0 -> 1 (0.0 -> 1.0), else c -> (-c)."""
    body = text.rstrip("uUlLfF")
    try:
        value = float(int(body, 16)) if body[:2].lower() == "0x" else float(body)
    except ValueError:
        return "(-" + text + ")"
    if value == 0.0:
        return "0x1" if body[:2].lower() == "0x" else "1" + text[1:] if text[0] == "0" else "1" + text
    return "(-" + text + ")"


def _c_sites(tokens: list[CToken]):
    """Yield ``(token index, kind, description, replacement text)`` per mutation site."""
    code = [i for i, t in enumerate(tokens) if t.kind not in ("ws", "comment", "preprocessor")]
    for n, i in enumerate(code):
        tok = tokens[i]
        prev = tokens[code[n - 1]] if n else None
        nxt = tokens[code[n + 1]] if n + 1 < len(code) else None
        if tok.kind == "punct":
            t = tok.text
            if t in ("+=", "-=", "*=", "/="):
                yield i, "arith", f"{t} -> {_C_ARITH[t]}", _C_ARITH[t]
            elif t in ("+", "-", "*", "/"):
                if _operand_end(prev):
                    yield i, "arith", f"{t} -> {_C_ARITH[t]}", _C_ARITH[t]
                elif t == "-":
                    yield i, "negation", "-x -> x", ""
            elif t in _C_COMPARE:
                yield i, "compare", f"{t} -> {_C_COMPARE[t]}", _C_COMPARE[t]
            elif t in _C_BOOLEAN:
                yield i, "boolean", f"{t} -> {_C_BOOLEAN[t]}", _C_BOOLEAN[t]
        elif tok.kind == "number":
            new = _c_negated(tok.text)
            yield i, "constant", f"{tok.text} -> {new}", new
            if (prev is not None and prev.text == "[" and nxt is not None and nxt.text == "]"
                    and re.fullmatch(r"\d+", tok.text)):
                k = int(tok.text)
                yield i, "off-by-one", f"[{k}] -> [{k + 1}]", str(k + 1)


def c_mutants(source: str) -> tuple[list[Mutant], list[str]]:
    """The mutants of a C source and their texts: one token replaced each (see the module's
    docstring); comments, string literals and preprocessor lines are left alone, and mutants
    whose text repeats an earlier one (``-2``: negation and constant) are dropped."""
    tokens = c_tokens(source)
    out, texts, seen = [], [], {source}
    for i, kind, desc, new in _c_sites(tokens):
        tok = tokens[i]
        text = source[:tok.start] + new + source[tok.start + len(tok.text):]
        if text in seen:
            continue
        seen.add(text)
        out.append(Mutant(len(out), tok.line, kind, desc, column=tok.column))
        texts.append(text)
    return out, texts


# The C kernels this harness can rebuild, with the module that loads each one's library
# (``available()``, ``load_error()``, ``library_path()``).
C_KERNELS = {"occore/lq/_sweep.c": "occore.lq.csweep"}
STILLBORN_RC = 17   # the selection's exit status when the mutant's library is not the one loaded

_C_CHECK_PLUGIN = '''"""Written by benchmarks/mutation.py: the selection runs only on the mutant's compiled library."""
import importlib
import os

import pytest


def pytest_sessionstart(session):
    mod = importlib.import_module(os.environ["MUTATION_C_LOADER"])
    root = os.path.realpath(os.environ["MUTATION_ROOT"])
    path = mod.library_path()
    if not mod.available() or path is None or not os.path.realpath(path).startswith(root + os.sep):
        pytest.exit(f"mutation: compiled library not loaded from the copy: {mod.load_error()} "
                    f"({path})", returncode=%d)
''' % STILLBORN_RC


class Sandbox:
    """A temporary copy of the repository, removed on any exit."""

    pytest_args: tuple = ()     # C mode (use_c_kernel): the plugin that checks the loaded library
    env: dict = {}              # (replaced, never changed in place)

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
               "-p", "no:warnings", *self.pytest_args, *selection]
        env = dict(os.environ, PYTHONPATH=self.path, PYTHONDONTWRITEBYTECODE="1", **self.env)
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
        if proc.returncode == STILLBORN_RC and b"mutation: compiled library not loaded" in out:
            return "stillborn", seconds
        if proc.returncode < 0 or b"Fatal Python error" in out:
            return "crashed", seconds                 # e.g. a segfault in compiled code
        if proc.returncode not in (0, 1):
            tail = out.decode(errors="replace").strip().splitlines()[-5:]
            if not any("failed" in line or "error" in line for line in tail):
                raise SystemExit("pytest could not run the selection:\n" + "\n".join(tail))
        return ("passed" if proc.returncode == 0 else "failed"), seconds

    def use_c_kernel(self, path: str) -> None:
        """C mode for the kernel ``path``: each run checks (a pytest plugin written into the copy)
        that its loader has loaded the copy's library, built from the source there, else the
        run is ``stillborn``; no test may pass on a fallback."""
        with open(os.path.join(self.path, "_mutation_c_check.py"), "w") as fh:
            fh.write(_C_CHECK_PLUGIN)
        self.pytest_args = ("-p", "_mutation_c_check")
        self.env = {"MUTATION_C_LOADER": C_KERNELS[path], "MUTATION_ROOT": self.path}
        self.c_dir = os.path.join(self.path, os.path.dirname(path))

    def build(self, timeout: float = 600.0) -> tuple[bool, float]:
        """Rebuilds the C extensions in the copy (``setup.py build_ext --inplace --force``);
        ``(built, seconds)``. The old libraries beside the kernel and the build folder are removed
        first, so that a failed build leaves none (setup.py's extension is optional: it then exits
        0, and ``--inplace`` would copy the last good library from ``build/`` into place)."""
        start = time.perf_counter()
        shutil.rmtree(os.path.join(self.path, "build"), ignore_errors=True)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for lib in glob.glob(os.path.join(glob.escape(self.c_dir), "*" + suffix)):
                os.remove(lib)
        try:
            proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                                   "--force"], cwd=self.path, capture_output=True,
                                  timeout=timeout, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - start
        built = proc.returncode == 0 and any(
            glob.glob(os.path.join(glob.escape(self.c_dir), "*" + suffix))
            for suffix in importlib.machinery.EXTENSION_SUFFIXES)
        return built, time.perf_counter() - start


def main(argv=None) -> int:
    args, selection = _parse(argv)
    path = os.path.normpath(args.file)
    with open(os.path.join(ROOT, path)) as fh:
        original = fh.read()
    is_c = path.endswith(".c")
    if is_c and path not in C_KERNELS:
        raise SystemExit(f"{path}: not a C kernel this harness can rebuild and check "
                         f"(known: {', '.join(C_KERNELS)})")
    found, texts = c_mutants(original) if is_c else mutants(original)
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        found = [m for m in found if m.index in keep]
    if args.list:
        for m in found:
            print(f"{m.index:4d}  line {_where(m)}  {m.kind:10s}  {m.description}")
        return 0
    box = Sandbox()
    target = os.path.join(box.path, path)
    if is_c:
        box.use_c_kernel(path)

    def run_one(text: str, timeout: float) -> tuple[str, float]:
        with open(target, "w") as fh:
            fh.write(text)
        build_s = 0.0
        if is_c:
            built, build_s = box.build()
            if not built:
                return "stillborn", build_s
        status, seconds = box.run(selection, timeout)
        return status, build_s + seconds

    try:
        status, base = run_one(original if is_c else ast.unparse(ast.parse(original)),
                               max(600.0, args.timeout or 0))
        if status != "passed":
            why = " (the extension did not build or load)" if status == "stillborn" else ""
            raise SystemExit(f"the selection does not pass on the unmutated {path}{why}; fix that first")
        timeout = args.timeout or max(30.0, 3 * base)
        print(f"{path}: {len(found)} mutants; selection {' '.join(selection)}; baseline "
              f"{base:.1f} s, timeout {timeout:.0f} s", flush=True)
        for m in found:
            status, m.seconds = run_one(texts[m.index], timeout)
            m.outcome = {"passed": "survived", "failed": "killed"}.get(status, status)
            print(f"  {m.index:4d} line {_where(m)} {m.kind:10s} {m.description:34s} "
                  f"{m.outcome} ({m.seconds:.1f} s)", flush=True)
    finally:
        box.close()
    killed = sum(m.outcome in ("killed", "timeout", "crashed") for m in found)
    stillborn = sum(m.outcome == "stillborn" for m in found)
    total = len(found) - stillborn
    survivors = [m for m in found if m.outcome == "survived"]
    rate = killed / total if total else float("nan")
    print(f"\n{path}: killed {killed} of {total} mutants ({100 * rate:.1f}%), "
          f"{len(survivors)} survived" + (f"; {stillborn} stillborn (did not build or load, "
                                          "not counted)" if is_c else ""))
    for m in survivors:
        print(f"  survived: #{m.index} line {_where(m).strip()}: {m.kind} {m.description}")
    if args.json:
        record = {"file": path, "selection": selection, "killed": killed, "total": total,
                  "mutants": [asdict(m) for m in found]}
        if is_c:
            record["stillborn"] = stillborn
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
    return 0


def _where(m: Mutant) -> str:
    """``line`` (Python) or ``line:column`` (C) of a mutant, padded."""
    return f"{m.line:4d}" if not m.column else f"{m.line:4d}:{m.column:<3d}"


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
