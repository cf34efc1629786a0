"""`occore train` at scale: --workers N gives the serial table, --checkpoint / --resume continue a
run exactly, --nproc N trains data-parallel (torch.distributed, gloo); bad options exit 2."""
import random
import re

import numpy as np
import pytest
import torch

from nn_adapter import cli

BASE = ["--dataset", "wine", "--optimizers", "ddpnopt,adam", "--depth", "2"]


@pytest.fixture
def own_rng():
    """Resuming sets the RNG states of this process: they are put back after the test."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    threads = torch.get_num_threads()
    yield
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    torch.set_num_threads(threads)


def _rows(out: str) -> dict:
    """{optimizer: (lr, train loss, test acc)} of the table (the time column left out)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(ddpnopt|adam)\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+$", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    return rows


def _train(capsys, *args) -> dict:
    assert cli.main(BASE + list(args)) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"ddpnopt", "adam"}
    return rows


def test_workers_give_the_serial_table(capsys, own_rng):
    assert _train(capsys, "--epochs", "2", "--workers", "2") == _train(capsys, "--epochs", "2")


def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, capsys, own_rng):
    _train(capsys, "--epochs", "2", "--checkpoint", str(tmp_path))
    resumed = _train(capsys, "--epochs", "4", "--resume", str(tmp_path), "--checkpoint", str(tmp_path))
    assert resumed == _train(capsys, "--epochs", "4")
    saved = torch.load(tmp_path / "ddpnopt" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and len(saved["extra"]["train_loss"]) == 4


def test_two_processes_train_data_parallel(capfd):
    """(The ranks print from their own processes: captured at the file descriptors.)"""
    serial = _train(capfd, "--epochs", "2")
    parallel = _train(capfd, "--epochs", "2", "--nproc", "2")
    for name in serial:          # float32: 2 x 16 samples and 1 x 32 agree to rounding
        assert float(parallel[name][1]) == pytest.approx(float(serial[name][1]), abs=2e-4)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--nproc", "3"], "not divisible by the 3 processes"),
    (["--nproc", "2", "--workers", "2"], "choose one"),
    (["--resume", "/nonexistent/run"], "no checkpoint /nonexistent/run/ddpnopt/checkpoint.pt"),
])
def test_bad_scaling_options_exit_2_before_any_work(args, message, capsys):
    assert cli.main(BASE + args) == 2
    assert message in capsys.readouterr().err


def test_resuming_a_run_of_another_network_is_refused(tmp_path, capsys, own_rng):
    _train(capsys, "--epochs", "1", "--checkpoint", str(tmp_path))
    assert cli.main(BASE + ["--epochs", "2", "--width", "16", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "another model or optimizer configuration" in err and "checkpoint.pt" in err
