"""benchmarks/classic.py runs end to end on the LQR (a smoke test of the script, not a timing)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "classic.py"


@pytest.fixture(scope="module")
def classic():
    spec = importlib.util.spec_from_file_location("classic_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_of_every_solver_on_the_lqr(classic, capsys):
    classic.main(["--problems", "lqr", "--repeats", "1", "--no-long", "--no-profile", "--no-torch"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("lqr ")]
    assert {r[2] for r in rows} == {"ilqr", "ddp", "fddp", "fddp-xs0", "fddp-lin", "fddp-lin-xs0", "ipopt", "fatrop"}
    assert all(r[3] == "CONVERGED" and abs(float(r[5]) - 5.1236462178827) < 1e-9 for r in rows)
    assert "worst ratio to IPOPT" in out and "worst rel. gap 0.0e+00" in out


def test_the_torch_table_takes_the_unconstrained_solvers(classic):
    import occore

    assert set(classic.TORCH_SOLVERS.values()) == {occore.ILQR, occore.DDP}


def _script(name):
    path = Path(__file__).resolve().parents[2] / name
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, words", [
    ("benchmarks/classic.py", ["--problems", "nosuch"], "--problems: unknown problem(s) ['nosuch']"),
    ("benchmarks/classic.py", ["--repeats", "0"], "--repeats 0: expected an integer >= 1"),
    ("benchmarks/classic.py", ["--horizons", "100,x"], "--horizons '100,x'"),     # was: after the tables
    ("benchmarks/classic.py", ["--horizons", "0"], "--horizons '0'"),
    ("benchmarks/classic.py", ["--no-torch", "--torch-only"], "exclude each other"),
    ("benchmarks/mpc.py", ["--problems", "pendulum,nosuch"], "--problems: unknown problem(s) ['nosuch']"),
    ("benchmarks/mpc.py", ["--steps", "0"], "--steps 0: expected an integer >= 1"),
    ("examples/demo.py", ["--plot", "/no/such/dir/c.png"], "--plot: cannot write"),  # was: after the comparison
    ("examples/demo.py", ["--bogus"], "unrecognized arguments: --bogus"),          # was: argparse's two lines
])
def test_bad_options_of_the_scripts_are_one_line_and_exit_2_before_any_work(script, argv, words, capsys,
                                                                            monkeypatch):
    import occore

    monkeypatch.setattr(occore, "compare", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(occore.problems, "make", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as done:
        _script(script).main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
