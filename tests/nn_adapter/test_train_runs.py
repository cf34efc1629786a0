"""`occore train` at scale (nn_adapter.train_runs): a command killed (SIGKILL) after an epoch and
resumed ends with the parameters and the record of the uninterrupted command; --workers 2 prints the
serial table; --nproc 2 equals one process (float64, 1e-10) and its checkpoint resumes on one; under
torchrun each process is a rank and rank 0 reports; bad options and bad checkpoints are one line
and exit 2 before any work; a failed checkpoint write keeps the good checkpoint."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint_run
import train_nets
from nn_adapter import checkpoint as ckpt
from nn_adapter import cli, distributed, train_runs

NETS = pathlib.Path(train_nets.__file__)
WINE = ["--dataset", "wine", "--no-progress", "--threads", "1"]


def _final(folder, run="ddpnopt-seed0"):
    return torch.load(pathlib.Path(folder) / run / ckpt.FILE_NAME, weights_only=True)


def _rows(out, columns=4):
    """The table's rows without the times and memory: optimizer, lr, loss, accuracy (and runs)."""
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ddpnopt", "adam", "ekfac"):
            rows.append(parts[:2 + 3 * (columns - 2)] + parts[-1:])
    return rows


def _run(capsys, argv):
    code = cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_a_killed_command_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path, capsys):
    argv = WINE + ["--optimizers", "ddpnopt,adam", "--net", f"{NETS}:dropout_fcn", "--epochs", "30"]
    folder = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(cli.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    first = folder / "ddpnopt-seed0" / ckpt.FILE_NAME
    killed_at = checkpoint_run.kill_after([sys.executable, "-m", "occore", "train", *argv, "--checkpoint", str(folder)],
                                          env, first, 2, poll=0.005)
    assert 2 <= killed_at < 30 and not (folder / "adam-seed0" / ckpt.FILE_NAME).exists()
    torch.manual_seed(99)                          # whatever this process's RNG holds
    resumed = _run(capsys, argv + ["--resume", str(folder), "--json", str(tmp_path / "r.json")])
    whole = _run(capsys, argv + ["--checkpoint", str(tmp_path / "whole"), "--json", str(tmp_path / "w.json")])
    for run in ("ddpnopt-seed0", "adam-seed0"):    # adam had not started: it runs from epoch 1
        a, b = _final(folder, run), _final(tmp_path / "whole", run)
        assert a["epoch"] == b["epoch"] == 30
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert _rows(resumed) == _rows(whole) and len(_rows(whole)) == 2
    r, w = (json.loads((tmp_path / f).read_text())["runs"] for f in ("r.json", "w.json"))
    for x, y in zip(r, w):
        assert (x["train_loss"], x["test_accuracy"], x["fingerprint"], x["steps"]) == \
            (y["train_loss"], y["test_accuracy"], y["fingerprint"], y["steps"])
        assert len(x["train_loss"]) == 30


def test_workers_2_prints_the_table_of_the_serial_run(tmp_path, capsys):
    argv = WINE + ["--optimizers", "ddpnopt,adam", "--seeds", "2", "--epochs", "2"]
    serial = _run(capsys, argv + ["--json", str(tmp_path / "s.json")])       # the plain loop of cli
    parallel = _run(capsys, argv + ["--workers", "2", "--json", str(tmp_path / "p.json")])
    assert _rows(parallel) == _rows(serial) and len(_rows(serial)) == 2
    s, p = (json.loads((tmp_path / f).read_text())["runs"] for f in ("s.json", "p.json"))
    assert [(x["optimizer"], x["seed"]) for x in p] == [(x["optimizer"], x["seed"]) for x in s]
    assert [(x["train_loss"], x["test_accuracy"], x["fingerprint"]) for x in p] == \
        [(x["train_loss"], x["test_accuracy"], x["fingerprint"]) for x in s]
    assert len({x["fingerprint"] for x in s}) == 2        # one per seed: the runs differ


def test_nproc_2_equals_one_process_and_its_checkpoint_resumes_on_one(tmp_path, capsys):
    argv = WINE + ["--optimizers", "ddpnopt", "--net", f"{NETS}:double_fcn", "--lr", "0.01"]
    two = _run(capsys, argv + ["--epochs", "2", "--nproc", "2", "--checkpoint", str(tmp_path / "two"),
                               "--json", str(tmp_path / "two.json")])
    one = _run(capsys, argv + ["--epochs", "2", "--checkpoint", str(tmp_path / "one"),
                               "--json", str(tmp_path / "one.json")])
    a, b = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    assert all(v.dtype == torch.float64 for v in b["model"].values())
    for k in b["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-10)
    x, y = (json.loads((tmp_path / f).read_text())["runs"][0] for f in ("two.json", "one.json"))
    assert x["train_loss"] == pytest.approx(y["train_loss"], rel=0, abs=1e-10)
    assert x["test_accuracy"] == y["test_accuracy"] and x["fingerprint"] == y["fingerprint"]
    assert _rows(two) == _rows(one)
    # the 2-rank checkpoint resumed on one process to epoch 3, against one process throughout
    _run(capsys, argv + ["--epochs", "3", "--resume", str(tmp_path / "two")])
    _run(capsys, argv + ["--epochs", "3", "--checkpoint", str(tmp_path / "whole")])
    a, b = _final(tmp_path / "two"), _final(tmp_path / "whole")
    assert a["epoch"] == b["epoch"] == 3 and a["world_size"] == 1
    for k in b["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-10)


def test_under_torchrun_each_process_is_a_rank_and_rank_0_reports(tmp_path, capsys):
    argv = WINE + ["--optimizers", "ddpnopt", "--net", f"{NETS}:double_fcn", "--lr", "0.01", "--epochs", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(cli.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "occore", "train", *argv, "--checkpoint", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    one = _run(capsys, argv + ["--checkpoint", str(tmp_path / "one")])
    assert _rows(done.stdout) == _rows(one) and len(_rows(one)) == 1      # one table, from rank 0
    a, b = _final(tmp_path / "two"), _final(tmp_path / "one")
    assert (a["world_size"], b["world_size"]) == (2, 1)
    for k in b["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-10)


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("work started")
    for module, name in ((cli, "run_all"), (train_runs, "_run_one"), (distributed, "launch"),
                         (distributed, "parallel_map")):
        monkeypatch.setattr(module, name, refuse)


def _refused(capsys, argv, message):
    assert cli.main(WINE + ["--epochs", "2"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("occore train: ")
    return err


@pytest.mark.parametrize("args, message", [
    (["--nproc", "3"], "--batch-size 32 is not divisible by the world size 3"),
    (["--nproc", "4"], "the last minibatch of each epoch has 14 of the 142 samples"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--nproc", "2", "--workers", "2"], "choose --nproc N"),
    (["--nproc", "2", "--optimizers", "adam,emsa"], "emsa: occore's solvers (emsa, ddp) run on one process"),
    (["--checkpoint", "CKPT", "--optimizers", "ddp"], "no optimizer state_dict"),
    (["--resume", "/nonexistent-dir"], "no such folder"),
    (["--checkpoint", "FILE"], "is a file, expected a folder"),
    (["--checkpoint", ""], "--checkpoint: an empty folder name"),      # was: checkpoints in the current folder
    (["--resume", ""], "--resume: an empty folder name"),
])
def test_bad_options_are_one_line_and_exit_2_before_any_work(args, message, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("x")
    args = [{"CKPT": str(tmp_path / "c"), "FILE": str(tmp_path / "file")}.get(a, a) for a in args]
    _refused(capsys, args, message)
    assert not (tmp_path / "c").exists()


def test_under_torchrun_the_environment_gives_the_world_size(monkeypatch, capsys, no_work):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert train_runs.wanted(cli.build_parser().parse_args([]))
    _refused(capsys, [], "not divisible by the world size 3")
    _refused(capsys, ["--batch-size", "48", "--nproc", "2"], "leave --nproc out under torchrun")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A command's checkpoint after 2 epochs (ddpnopt on WINE)."""
    folder = tmp_path_factory.mktemp("saved")
    with torch.random.fork_rng():
        assert cli.main(WINE + ["--optimizers", "ddpnopt", "--epochs", "2", "--checkpoint", str(folder)]) == 0
    return folder


def _copy(saved, tmp_path, run="ddpnopt-seed0"):
    folder = tmp_path / "copy"
    shutil.copytree(saved / "ddpnopt-seed0", folder / run)
    return folder, folder / run / ckpt.FILE_NAME


@pytest.mark.parametrize("args, message", [
    # the run's settings are compared before the model and optimizer they imply
    (["--width", "8"], "written by a run with --width None, this one has --width 8"),
    (["--dataset", "digits"], "written by a run with --dataset wine, this one has --dataset digits"),
    (["--lr", "0.01"], "written by a run with --lr 0.003, this one has --lr 0.01"),
    (["--batch-size", "16"], "--batch-size 32, this one has --batch-size 16"),
    (["--seed", "1"], "no checkpoint of these runs there"),
    (["--epochs", "1"], "holds epoch 2, beyond --epochs 1"),
])
def test_a_checkpoint_of_other_settings_is_refused_and_kept(saved, tmp_path, capsys, no_work, args, message):
    folder, path = _copy(saved, tmp_path)
    before = path.read_bytes()
    _refused(capsys, ["--optimizers", "ddpnopt", "--resume", str(folder)] + args, message)
    assert path.read_bytes() == before


def test_a_checkpoint_of_another_optimizer_is_refused(saved, tmp_path, capsys, no_work):
    folder, path = _copy(saved, tmp_path, run="adam-seed0")        # ddpnopt's state in adam's folder
    err = _refused(capsys, ["--optimizers", "adam", "--resume", str(folder)],
                   "written by a run with --optimizers ddpnopt, this one has --optimizers adam")
    assert str(path) in err


def test_a_corrupted_checkpoint_is_refused_and_kept(saved, tmp_path, capsys, no_work):
    folder, path = _copy(saved, tmp_path)
    path.write_bytes(path.read_bytes()[:3000])          # truncated, as by a crash without the rename
    before = path.read_bytes()
    _refused(capsys, ["--optimizers", "ddpnopt", "--resume", str(folder)], "corrupted or truncated")
    assert path.read_bytes() == before


def test_a_fresh_run_does_not_overwrite_checkpoints(saved, tmp_path, capsys, no_work):
    folder, path = _copy(saved, tmp_path)
    before = path.read_bytes()
    _refused(capsys, ["--optimizers", "adam,ddpnopt", "--checkpoint", str(folder)], "holds a checkpoint already")
    assert path.read_bytes() == before


def test_a_failed_write_keeps_the_good_checkpoint(saved, tmp_path, capsys, monkeypatch):
    folder, path = _copy(saved, tmp_path)
    before = path.read_bytes()

    def disk_full(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    assert cli.main(WINE + ["--optimizers", "ddpnopt", "--epochs", "4", "--resume", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "last checkpoint written is kept" in err
    assert path.read_bytes() == before and checkpoint_run.saved_epoch(path) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == [ckpt.FILE_NAME]      # no partial file left
