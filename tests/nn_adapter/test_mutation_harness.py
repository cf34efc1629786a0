"""benchmarks/mutation.py: the mutants are the one-line slips it names, messages are left alone,
and a run never changes the working tree."""
import ast
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mutation.py"


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # (its dataclass resolves annotations there)
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


SOURCE = '''
def f(a, b, xs):
    """Docstring 1 + 2."""
    if a < b and b > 0:
        raise ValueError(f"bad {a + 1}")
    total = 0
    for i in range(len(xs)):
        total += xs[i] * 2
    return -total + xs[0] - a / b
'''


def _run(text):
    scope = {}
    exec(compile(text, "<mutant>", "exec"), scope)
    try:
        return scope["f"](3.0, 2.0, [1.0, 2.0, 4.0])
    except Exception as err:            # noqa: BLE001 - a crashing mutant is a changed one
        return type(err).__name__


def test_each_mutant_is_one_change_of_a_named_kind_and_messages_are_not_mutated(mutation):
    found, texts = mutation.mutants(SOURCE)
    kinds = {m.kind for m in found}
    assert kinds == {"arith", "compare", "constant", "drop-term", "negation", "boolean",
                     "off-by-one"}
    original = _run(SOURCE)
    assert original == -14.0 + 1.0 - 1.5
    changed = 0
    for m, text in zip(found, texts):
        ast.parse(text)
        assert "Docstring 1 + 2." in text and "bad {a + 1}" in text
        assert text != ast.unparse(ast.parse(SOURCE))
        changed += _run(text) != original
    # all but the equivalent ones change f's value on this input (range stop + 1 raises)
    assert changed >= len(found) - 3
    descriptions = {(m.kind, m.description) for m in found}
    assert ("compare", "< -> <=") in descriptions and ("boolean", "and -> or") in descriptions
    assert ("off-by-one", "range(.., n) -> range(.., n + 1)") in descriptions
    assert ("off-by-one", "[0] -> [1]") in descriptions


def test_a_run_works_in_a_copy_and_leaves_the_tree_as_it_was(mutation, tmp_path):
    """One mutant of MMCLoss's centres (row 0 = e_1 -> -e_1 ... ) against its doctest."""
    kernel = ROOT / "nn_adapter" / "losses.py"
    before = hashlib.sha256(kernel.read_bytes()).hexdigest()
    found, _ = mutation.mutants(kernel.read_text())
    pick = next(m.index for m in found if m.kind == "drop-term")
    done = subprocess.run([sys.executable, str(SCRIPT), "nn_adapter/losses.py", "--only",
                           str(pick), "--timeout", "120", "--json", str(tmp_path / "out.json"),
                           "--", "nn_adapter/losses.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 mutants" in done.stdout and "of 1 mutants" in done.stdout
    assert (tmp_path / "out.json").exists()
    assert hashlib.sha256(kernel.read_bytes()).hexdigest() == before


def test_a_selection_that_crashes_counts_as_a_kill(mutation, tmp_path):
    """A mutant that makes the test process die (a segfault in compiled code) is killed, not an
    error of the selection; a passing selection passes."""
    (tmp_path / "test_crash.py").write_text(
        "import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    assert True\n")
    box = object.__new__(mutation.Sandbox)      # a sandbox of tmp_path: no copy of the tree
    box.path = str(tmp_path)
    assert box.run(["test_crash.py"], timeout=120)[0] == "crashed"
    assert box.run(["test_fine.py"], timeout=120)[0] == "passed"


C_SOURCE = r'''/* a * b + 1 < 2 in a comment */
#include <stddef.h>
#define SCALE(x) (2 * (x) - \
                  1)
static const char *name = "x * y - 1 < 2 && 3";
double f(const double *a, int n, double *out, size_t *len) {
    double *p = out, s = 0.0;   // i + 1 <= n
    for (int i = 0; i < n; ++i) s += a[i] * 2.5 - a[0];
    *p = -s / n;
    *len = (size_t)n;
    return (n >= 1 && s != 0.0) ? s : (double)n * sizeof(double);
}
'''


def test_c_mutants_change_code_only_and_never_a_pointer_star(mutation):
    """The C mode's mutants of a small function: exactly the one-token slips of its code; nothing
    in the comments, the string, the preprocessor lines (one continued), and no ``*`` of a pointer
    declaration or dereference (``const double *a``, ``*p = ...``, ``size_t *len``)."""
    assert "".join(t.text for t in mutation.c_tokens(C_SOURCE)) == C_SOURCE
    found, texts = mutation.c_mutants(C_SOURCE)
    assert [(m.line, m.column, m.kind, m.description) for m in found] == [
        (7, 26, "constant", "0.0 -> 1.0"),
        (8, 18, "constant", "0 -> 1"), (8, 23, "compare", "< -> <="),
        (8, 35, "arith", "+= -> -="), (8, 43, "arith", "* -> /"),
        (8, 45, "constant", "2.5 -> (-2.5)"), (8, 49, "arith", "- -> +"),
        (8, 53, "constant", "0 -> 1"),               # a[0] -> a[1] (the off-by-one is the same text)
        (9, 10, "negation", "-x -> x"), (9, 13, "arith", "/ -> *"),
        (11, 15, "compare", ">= -> >"), (11, 18, "constant", "1 -> (-1)"),
        (11, 20, "boolean", "&& -> ||"), (11, 25, "compare", "!= -> =="),
        (11, 28, "constant", "0.0 -> 1.0"), (11, 49, "arith", "* -> /")]
    lines = C_SOURCE.splitlines()
    for m, text in zip(found, texts):
        changed = text.splitlines()
        diff = [i for i, (a, b) in enumerate(zip(lines, changed)) if a != b]
        assert diff == [m.line - 1] and len(changed) == len(lines)
        assert changed[m.line - 1][:m.column - 1] == lines[m.line - 1][:m.column - 1]
    # an integer index in brackets gets its own off-by-one mutant when it is not 0
    found, _ = mutation.c_mutants("void g(double *v) { v[2] = v[1] * 3; }\n")
    assert [(m.kind, m.description) for m in found] == [
        ("constant", "2 -> (-2)"), ("off-by-one", "[2] -> [3]"), ("constant", "1 -> (-1)"),
        ("off-by-one", "[1] -> [2]"), ("arith", "* -> /"), ("constant", "3 -> (-3)")]


def test_c_mutants_are_valid_c(mutation, tmp_path):
    """Each mutant of the snippet still compiles (no ``*`` of a declaration turned into ``/``), so
    a mutant that does not build in a real run is a rare, honest stillborn."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    _, texts = mutation.c_mutants(C_SOURCE)
    for i, text in enumerate([C_SOURCE] + texts):
        src = tmp_path / f"m{i}.c"
        src.write_text(text)
        done = subprocess.run([cc, "-std=c99", "-fsyntax-only", str(src)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, (i, done.stderr)


LOADER = '''
import os
from pathlib import Path

def library_path():
    return Path(os.environ["FAKE_LIBRARY"])

def available():
    return os.environ.get("FAKE_AVAILABLE") == "1"

def load_error():
    return None if available() else "not built (fake)"
'''


def test_c_mode_never_counts_a_run_on_the_fallback(mutation, tmp_path, monkeypatch):
    """C mode: a selection passes only when the loader has the library of the copy loaded; when
    the library is missing, stale (the loader refuses it) or another one, the run is stillborn,
    however the tests fare on the fallback."""
    (tmp_path / "fake_loader.py").write_text(LOADER)
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    assert True\n")
    monkeypatch.setitem(mutation.C_KERNELS, "k/x.c", "fake_loader")
    box = object.__new__(mutation.Sandbox)
    box.path = str(tmp_path)
    box.use_c_kernel("k/x.c")
    inside, outside = tmp_path / "k" / "_lib.so", tmp_path.parent / "_lib.so"
    for available, lib, expected in [("1", inside, "passed"), ("0", inside, "stillborn"),
                                     ("1", outside, "stillborn")]:
        monkeypatch.setenv("FAKE_AVAILABLE", available)
        monkeypatch.setenv("FAKE_LIBRARY", str(lib))
        assert box.run(["test_fine.py"], timeout=120)[0] == expected, (available, lib)


def test_c_mode_build_fails_without_a_library(mutation, tmp_path):
    """setup.py's optional extension exits 0 when it does not compile: the build is a failure
    because the library is gone, not by the exit status."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    (tmp_path / "k").mkdir()
    (tmp_path / "setup.py").write_text(
        "from setuptools import Extension, setup\n"
        "setup(name='k', ext_modules=[Extension('k._lib', sources=['k/x.c'], optional=True)])\n")
    box = object.__new__(mutation.Sandbox)
    box.path, box.c_dir = str(tmp_path), str(tmp_path / "k")
    (tmp_path / "k" / "x.c").write_text("int k_one(void) { return 1; }\n")
    assert box.build(timeout=300)[0]
    (tmp_path / "k" / "x.c").write_text("int k_one(void) { return 1 / ; }\n")
    assert not box.build(timeout=300)[0]
    assert not list((tmp_path / "k").glob("_lib*"))
