"""The occore command line: solve, compare, list, bad input, python -m occore."""
import json
import subprocess
import sys

import pytest

from occore.cli import main


def test_solve_prints_the_iteration_table_then_the_summary(capsys):
    assert main(["solve", "pendulum", "--solver", "ilqr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["iter", "cost", "expected"]
    rows = [line for line in out if line.strip() and line.split()[0].isdigit()]
    assert len(rows) == 10                      # iLQR solves the pendulum in 10 iterations
    assert any(line.startswith("ilqr: CONVERGED after 10 iterations") for line in out)
    assert "3.03850116945" in "\n".join(out)


def test_solve_emsa_and_ipopt(capsys):
    assert main(["solve", "unicycle", "--solver", "emsa", "--max-iter", "3"]) == 0
    out = capsys.readouterr().out
    assert "emsa: MAX_ITER after 3 iterations" in out and out.count("\n    ") >= 3
    assert main(["solve", "lqr", "--solver", "ipopt", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ipopt: CONVERGED after 1 iteration " in out and "iter" not in out.split("\n", 1)[1].split("ipopt:")[0]


def test_solve_with_the_torch_backend(capsys):
    pytest.importorskip("torch")
    assert main(["solve", "lqr", "--backend", "torch", "--solver", "ilqr", "--quiet"]) == 0
    assert "5.12364621788" in capsys.readouterr().out


def test_compare_writes_table_plot_and_json(tmp_path, capsys):
    png, js = tmp_path / "c.png", tmp_path / "c.json"
    assert main(["compare", "--problems", "lqr,unicycle", "--solvers", "ilqr,ipopt", "--plot", str(png),
                 "--json", str(js), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("lqr", "unicycle"))]
    assert len(lines) == 4 and all("CONVERGED" in line for line in lines)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads(js.read_text())["records"]) == 4
    assert main(["compare", "--problems", "lqr", "--solvers", "ilqr", "--markdown", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("| problem | solver |")


@pytest.mark.parametrize("argv, message", [
    (["solve", "acrobot"], "valid problems are all, lqr, pendulum, cartpole, unicycle, pendulum_box"),
    (["solve", "lqr", "--solver", "sgd"], "valid solvers are ddp, ilqr, emsa, ipopt"),
    (["compare", "--solvers", "ddp,adam"], "valid solvers are ddp, ilqr, emsa, ipopt"),
    (["solve", "lqr", "--max-iter", "0"], "--max-iter"),
])
def test_bad_names_exit_2_listing_the_valid_ones(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("occore: error:") and message in err


def test_user_file_that_fails_to_import_reports_file_and_line(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("import occore\n\nprob = occore.problems.make('lqr')\nprob.oops()\n")
    assert main(["compare", "--problems", str(path), "--solvers", "ddp", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4" in err and "AttributeError" in err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cartpole" in out and "4.402379222" in out and "emsa-gradient" in out


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "occore", "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "pendulum_box" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "occore", "solve"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "problem" in proc.stderr     # argparse: the problem is required


def test_solve_a_user_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text("import casadi as ca\nimport occore\n\nPROBLEMS = [occore.Problem(lambda x, u: x + 0.1 * u, "
                    "lambda x, u: ca.sumsqr(x) + ca.sumsqr(u), lambda x: 10 * ca.sumsqr(x), x0=[1.0], nu=1, "
                    "horizon=20, name='scalar')]\n")
    assert main(["solve", str(path), "--solver", "ilqr"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scalar: Problem(scalar") and "ilqr: CONVERGED" in out
