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
