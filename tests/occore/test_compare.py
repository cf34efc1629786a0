"""occore.compare: records, best cost and gaps, levels reached, variants, user files, outputs."""
import json

import numpy as np
import pytest

import occore
from occore.comparison import runner
from occore.comparison.runner import _box_violation
from occore.problems import OPTIMA


@pytest.fixture(scope="module")
def cmp():
    return occore.compare("lqr,pendulum", ["ddp", "ipopt", "emsa"], max_iter=20)


def test_records_best_and_gaps(cmp):
    assert [(r.problem, r.solver) for r in cmp.records] == [
        ("lqr", "ddp"), ("lqr", "ipopt"), ("lqr", "emsa"), ("pendulum", "ddp"), ("pendulum", "ipopt"),
        ("pendulum", "emsa")]
    for name in ("lqr", "pendulum"):
        assert cmp.best[name] == pytest.approx(OPTIMA[name], rel=1e-8)
        rows = [r for r in cmp.records if r.problem == name]
        assert min(r.gap for r in rows) == 0.0
        for r in rows:
            assert r.gap == pytest.approx((r.cost - cmp.best[name]) / cmp.best[name], rel=1e-12, abs=1e-300)
            assert r.box_violation == 0.0 and r.wall_time > 0
            assert len(r.iteration_costs) == r.iterations + 1 == len(r.iteration_times)
    emsa = next(r for r in cmp.records if r.problem == "pendulum" and r.solver == "emsa")
    assert emsa.status == "MAX_ITER" and emsa.iterations == 20 and emsa.gap > 1.0


def test_levels_reached_are_the_first_crossings(cmp):
    for r in cmp.records:
        best = cmp.best[r.problem]
        for lvl in (1e-2, 1e-4):
            inside = [k for k, c in enumerate(r.iteration_costs) if c - best <= lvl * best]
            if inside:
                assert r.reached[lvl] == (inside[0], r.iteration_times[inside[0]])
            else:
                assert r.reached[lvl] is None
    ddp = next(r for r in cmp.records if r.problem == "lqr" and r.solver == "ddp")
    assert ddp.reached[1e-4][0] == 1        # the LQR is solved by one Newton step
    table = cmp.table()
    assert "not reached in 20" in table     # E-MSA on the pendulum swing-up
    assert table.splitlines()[0].split()[:4] == ["problem", "solver", "status", "iters"]


def test_markdown_json_and_plot(cmp, tmp_path):
    md = cmp.table(markdown=True).splitlines()
    assert md[0].startswith("| problem | solver | status |") and len(md) == 2 + len(cmp.records)
    path = tmp_path / "runs.json"
    cmp.to_json(str(path))
    data = json.loads(path.read_text())
    assert len(data["records"]) == 6 and data["best"]["lqr"] == cmp.best["lqr"]
    rec = data["records"][0]
    assert {"problem", "solver", "status", "iterations", "cost", "gap", "box_violation", "wall_time",
            "time_per_iteration", "reached", "iteration_costs", "iteration_times"} <= set(rec)
    png = tmp_path / "cmp.png"
    cmp.plot(str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path", [1, 2.0, None])
def test_to_json_refuses_a_path_that_is_not_a_file_name(cmp, path, capfd):
    """open(1, "w") is the process's stdout: the records would be printed and stdout closed."""
    with pytest.raises(TypeError, match="path: expected a file name"):
        cmp.to_json(path)
    assert capfd.readouterr().out == ""
    print("stdout still open")
    assert capfd.readouterr().out == "stdout still open\n"


@pytest.mark.parametrize("path", [5, None])
def test_plot_refuses_a_path_that_is_not_a_file_name(cmp, path):
    from occore.mpc import ClosedLoop, plot_closed_loop

    with pytest.raises(TypeError, match="path: expected a file name"):
        cmp.plot(path)
    run = ClosedLoop(xs=np.zeros((3, 1)), us=np.zeros((2, 1)), latencies=np.ones(2))
    with pytest.raises(TypeError, match="path: expected a file name"):
        plot_closed_loop(run, path)


def test_plot_keeps_the_users_matplotlib_backend_and_figures(cmp, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_backend()
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        cmp.plot(str(tmp_path / "cmp.png"))
        assert plt.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_a_solver_name_twice_or_two_problems_of_one_name_are_refused_before_any_run(monkeypatch):
    """The table and the plot tell the records apart by name: a second record of one name would
    be mixed with the first, a second problem of one name replaced it (compared once)."""
    def no_run(*args, **kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr(runner, "run_one", no_run)
    with pytest.raises(occore.InputError, match="solvers: 'ilqr' is given twice"):
        occore.compare("lqr", "ilqr,ddp,ilqr")
    short, long = occore.problems.make("pendulum", horizon=20), occore.problems.make("pendulum")
    with pytest.raises(occore.InputError, match="two different problems are named 'pendulum'"):
        occore.compare([short, long], ["ilqr"])
    monkeypatch.undo()
    cmp = occore.compare({"short": short, "long": long}, ["ilqr"], max_iter=2)
    assert cmp.problems == ["short", "long"]
    assert occore.compare("lqr,all", ["ilqr"], max_iter=1).problems == list(occore.problems.NAMES)


def test_variants_and_solver_objects():
    res = occore.compare("unicycle", ["ilqr-nols", "ilqr-fixedreg", "emsa-gradient", occore.ILQR(max_iter=3)],
                         max_iter=40)
    by = {r.solver: r for r in res.records}
    assert by["ilqr-nols"].status == "CONVERGED" and by["ilqr-fixedreg"].status == "CONVERGED"
    assert by["ilqr"].iterations == 3 and by["ilqr"].status == "MAX_ITER"
    assert by["emsa-gradient"].cost < by["emsa-gradient"].iteration_costs[0]


def test_a_solver_refusing_a_problem_is_recorded_not_fatal():
    pytest.importorskip("torch")
    res = occore.compare("lqr", "ilqr,ipopt", backend="torch")
    ilqr, ipopt = res.records
    assert ilqr.status == "CONVERGED" and ilqr.gap == 0.0
    assert ipopt.status == "ERROR" and "torch" in ipopt.message and np.isnan(ipopt.gap)
    assert "ERROR" in res.table()


def test_box_violation_is_measured():
    prob = occore.problems.make("pendulum_box")
    us = np.zeros((100, 1))
    us[5] = 2.5
    us[7] = -2.25
    assert _box_violation(prob, us) == pytest.approx(0.5)
    assert _box_violation(prob, np.zeros((100, 1))) == 0.0
    assert _box_violation(occore.problems.make("pendulum"), us) == 0.0


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(occore.InputError, match="valid solvers are ddp, ilqr, emsa, ipopt"):
        occore.compare("lqr", "ddp,newton")
    with pytest.raises(occore.InputError, match="valid problems are all, lqr, pendulum"):
        occore.compare("lqr,acrobot", "ddp")
    with pytest.raises(occore.InputError, match="max_iter"):
        occore.compare("lqr", "ddp", max_iter=0)
    with pytest.raises(occore.InputError, match="repeat"):
        occore.compare("lqr", "ddp", repeat=0)


def test_repeat_and_warmup_change_only_the_times():
    a = occore.compare("unicycle", "ilqr,ipopt", repeat=2).records
    b = occore.compare("unicycle", "ilqr,ipopt", warmup=False).records
    for x, y in zip(a, b):
        assert (x.status, x.iterations, x.cost, x.iteration_costs) == (y.status, y.iterations, y.cost, y.iteration_costs)


PROBLEM_FILE = '''
import casadi as ca
import occore

double = occore.Problem(lambda x, u: ca.vertcat(x[0] + 0.1 * x[1], x[1] + 0.1 * u[0]),
                        lambda x, u: 0.5 * ca.sumsqr(x) + 0.05 * ca.sumsqr(u),
                        lambda x: 5 * ca.sumsqr(x), x0=[1.0, 0.0], nu=1, horizon=40, name="double_integrator")
'''


def test_user_problem_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(PROBLEM_FILE)
    res = occore.compare(str(path), "ilqr,ipopt")
    assert [r.problem for r in res.records] == ["double_integrator"] * 2
    assert all(r.status == "CONVERGED" for r in res.records)
    assert abs(res.records[0].cost - res.records[1].cost) <= 1e-9 * res.records[1].cost
    listed = tmp_path / "listed.py"
    listed.write_text(PROBLEM_FILE + "\nPROBLEMS = {'a': double, 'b': double}\n")
    assert occore.compare(str(listed), "ilqr").problems == ["double_integrator"]   # named by Problem.name


@pytest.mark.parametrize("body, line", [
    ("import casadi\nx = 1\nraise RuntimeError('boom')\n", 3),
    ("x = 1\ndef f(:\n", 2),
    ("import occore\n\ndef make():\n    return 1 / 0\n\nbad = make()\n", 4),
])
def test_a_failing_user_file_reports_file_and_line(tmp_path, body, line):
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(occore.InputError, match=rf"broken\.py:{line}"):
        occore.compare(str(path), "ddp")


def test_file_without_problems(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(occore.InputError, match="defines no occore.Problem"):
        occore.compare(str(path), "ddp")
    with pytest.raises(occore.InputError, match="does not exist"):
        occore.compare(str(tmp_path / "nope.py"), "ddp")


def test_progress_goes_to_stderr(capsys):
    occore.compare("lqr", "ilqr", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_constrained_problems_side_by_side():
    """`compare` puts CDDP beside IPOPT (and the refusing unconstrained solvers) on the constrained
    set: the violation column, the best cost taken from feasible records only."""
    res = occore.compare("pendulum_terminal,cartpole_track", "cddp,ipopt,ilqr,fddp")
    by = {(r.problem, r.solver): r for r in res.records}
    for name in ("pendulum_terminal", "cartpole_track"):
        assert res.best[name] == pytest.approx(OPTIMA[name], rel=1e-6)
        assert by[name, "cddp"].status == "CONVERGED" and abs(by[name, "cddp"].gap) <= 1e-6
        assert by[name, "cddp"].constraint_violation <= 1e-6
        for refusing in ("ilqr", "fddp"):
            assert by[name, refusing].status == "ERROR" and "cannot honour" in by[name, refusing].message
    assert "constr viol" in res.table().splitlines()[0]
    with pytest.raises(occore.InputError, match="constrained, unicycle_obstacles"):
        occore.compare("acrobot", "cddp")


def test_the_best_cost_ignores_infeasible_records():
    from occore.comparison.runner import Comparison, Record

    def rec(solver, cost, viol):
        return Record(problem="p", solver=solver, status="CONVERGED", message="", iterations=1, cost=cost,
                      wall_time=1.0, box_violation=0.0, constraint_violation=viol, iteration_costs=[9.0, cost],
                      iteration_times=[0.0, 1.0])
    cmp = Comparison([rec("a", 1.0, 0.5), rec("b", 2.0, 0.0), rec("c", 3.0, 1e-9)])
    assert cmp.best["p"] == 2.0 and cmp.records[0].gap == -0.5
    assert Comparison([rec("a", 1.0, 0.5), rec("b", 2.0, 0.1)]).best["p"] == 1.0   # none feasible: the lowest


def test_numpy_integer_counts_are_accepted_and_recorded_as_ints(tmp_path):
    import json

    import numpy as np

    cmp = occore.compare("lqr", ["ddp"], max_iter=np.int64(5), repeat=np.int64(1), workers=np.int64(1),
                         progress=False)
    cmp.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["records"][0]["status"] == "CONVERGED"
    with pytest.raises(occore.InputError, match="max_iter=True"):
        occore.compare("lqr", ["ddp"], max_iter=True, progress=False)
