"""benchmarks/mutation.py: the mutants are the one-line slips it names, messages are left alone,
and a run never changes the working tree."""
import ast
import hashlib
import importlib.util
import os
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
