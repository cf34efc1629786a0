"""occore.compare(workers=N) and `occore compare --workers N`: the pairs run in other processes,
the records and the table are those of the serial run (times aside)."""
import re

import pytest

import occore
from occore.cli import main

PROBLEMS, SOLVERS = "lqr,pendulum", "ddp,ilqr,emsa"


def _timeless(record):
    return (record.problem, record.solver, record.status, record.message, record.iterations,
            record.cost, record.gap, record.box_violation, record.iteration_costs,
            {lvl: None if v is None else v[0] for lvl, v in record.reached.items()})


def test_parallel_records_are_the_serial_ones():
    serial = occore.compare(PROBLEMS, SOLVERS, max_iter=20)
    parallel = occore.compare(PROBLEMS, SOLVERS, max_iter=20, workers=2)
    assert [_timeless(r) for r in parallel.records] == [_timeless(r) for r in serial.records]
    assert parallel.best == serial.best


def _table_without_times(text: str) -> list:
    rows = []
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 9:   # drop "time [ms]" and "ms/iter", and the times of the "to ... of best" cells
            cells = cells[:8] + [re.sub(r",\s*\S+ m?s$", "", c) for c in cells[10:]]
        rows.append(cells)
    return rows


def test_the_cli_prints_the_serial_table(capsys):
    args = ["compare", "--problems", PROBLEMS, "--solvers", SOLVERS, "--max-iter", "20",
            "--no-progress"]
    assert main(args) == 0
    serial = capsys.readouterr().out
    assert main(args + ["--workers", "2"]) == 0
    parallel = capsys.readouterr().out
    assert _table_without_times(parallel) == _table_without_times(serial)
    assert "pendulum" in serial and "emsa" in serial


@pytest.mark.parametrize("workers", [0, -2, 1.5, True])
def test_bad_worker_counts_are_refused(workers):
    with pytest.raises(occore.OccoreError, match="workers"):
        occore.compare("lqr", "ddp", workers=workers)


def test_problem_objects_need_one_worker():
    prob = occore.problems.make("lqr")
    with pytest.raises(occore.OccoreError, match="workers"):
        occore.compare([prob], "ddp", workers=2)
    assert occore.compare([prob], "ddp").records[0].status == "CONVERGED"
