"""`occore train` end to end: options checked before any work, the same start for every optimizer,
E-MSA and vanilla DDP training with their defaults, the mean +- std table, --plot and --json."""
import json
import os
import sys

import pytest
import torch

import occore.cli
from nn_adapter import cli, data
from nn_adapter.networks import build_network
from nn_adapter.training import compare_optimizers, fingerprint, make_optimizer, train_classifier

QUICK = ["--dataset", "wine", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def wine():
    return data.load("wine")


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "x"], "invalid int value"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--lr", "-1"], "finite number > 0"),
    (["--lr", "fast"], "not a number"),
    (["--lr", "1e300"], "at most 3.4e+38"),              # torch's float32 update overflowed
    (["--lr", "adamw=0.1"], "not one of the --optimizers"),
    (["--lr", "0.1,0.2"], "gives the common learning rate twice"),
    (["--lr", "adam=0.1,adam=0.2"], "gives the learning rate of adam twice"),
    (["--optimizers", "ddp", "--lr", "2"], "0 < lr <= 1"),
    (["--batch-size", "143"], "larger than the 142 training samples"),
    (["--width", "0"], "--width must be >= 1"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--seed", str(2**64)], "seeds must be at most 18446744073709551615"),      # torch.manual_seed overflowed
    (["--seed", str(2**64 - 1), "--seeds", "2"], "--seed 18446744073709551615 with --seeds 2"),
    (["--threads", str(10**9)], "--threads must be at most"),   # OpenMP aborted the process
    (["--optimizers", "adam,adam"], "twice"),
    (["--optimizers", "lbfgs"], "unknown optimizer"),
    (["--plot", "/nonexistent-dir/t.png"], "does not exist"),
    (["--json", "/nonexistent-dir/t.json"], "does not exist"),
    (["--json", ""], "--json: an empty file name"),
    (["--plot", ""], "--plot: an empty file name"),
    (["--net", "cnn"], "square images"),
    (["--net", "no_such_module_xyz:f"], "cannot import"),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "--device"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "never downloaded"),
])
def test_bad_options_are_one_line_and_exit_2_before_any_work(args, message, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(cli, "run_all", no_training)
    assert cli.main(QUICK + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("occore train: ")


def test_unwritable_output_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_all", lambda *a: pytest.fail("training started"))
    assert cli.main(QUICK + ["--plot", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    if os.geteuid() != 0:           # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert cli.main(QUICK + ["--json", str(ro / "x.json")]) == 2
        assert "permission denied" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(QUICK + ["--plot", str(tmp_path / "t.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_every_optimizer_gets_the_same_weights_and_minibatches(wine):
    make = lambda: build_network("fcn", wine.input_shape, 3, dataset="wine")  # noqa: E731
    torch.manual_seed(123)          # whatever the global RNG holds: the seed decides
    names = ["sgd-m", "adam", "ekfac", "ddpnopt", "emsa"]
    recs = compare_optimizers(make, wine, names, epochs=1, batch_size=32, seed=4)
    prints = {r.fingerprint for r in recs.values()}
    assert len(prints) == 1 and "" not in prints
    other = compare_optimizers(make, wine, ["adam"], epochs=1, batch_size=32, seed=5)["adam"].fingerprint
    assert other not in prints      # another seed: other weights and batches, so the check can fail
    torch.manual_seed(4)
    model = make()
    from nn_adapter.data import batch_indices
    gen = torch.Generator().manual_seed(4)
    assert fingerprint(model, batch_indices(len(wine.x_train), 32, gen)) in prints


@pytest.mark.parametrize("name", ["emsa", "ddp"])
def test_emsa_and_vanilla_ddp_train_wine_with_their_defaults(wine, name):
    torch.manual_seed(0)
    model = build_network("fcn", wine.input_shape, 3, dataset="wine")
    first = []
    rec = train_classifier(model, wine, make_optimizer(name, model), epochs=4, batch_size=32,
                           progress=lambda e, s, n, loss, t: first.append(loss))
    assert not rec.stopped and first[0] > 0.9          # ln 3 = 1.10 at the start
    assert rec.train_loss[-1] < 0.3 * first[0] and rec.test_accuracy[-1] >= 0.9


def test_table_plot_and_json_over_seeds(tmp_path, capsys):
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    argv = ["train", "--dataset", "wine", "--optimizers", "ddpnopt,adam", "--epochs", "2", "--seeds", "2",
            "--lr", "0.01", "--plot", str(png), "--json", str(js)]
    assert occore.cli.main(argv) == 0                   # through the occore command line's plugin
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith(("ddpnopt", "adam"))]
    assert len(rows) == 2 and all(line.count("+-") == 4 for line in rows)
    assert "seed 1" in captured.err                     # the progress bars
    assert png.stat().st_size > 10_000
    doc = json.loads(js.read_text())
    assert doc["command"][:2] == ["occore", "train"] and "torch" in doc["versions"]
    assert len(doc["runs"]) == 4 and {r["seed"] for r in doc["runs"]} == {0, 1}
    runs = [r for r in doc["runs"] if r["optimizer"] == "adam"]
    mean = sum(r["test_accuracy"][-1] for r in runs) / 2
    assert doc["summary"]["adam"]["test_accuracy"][0] == pytest.approx(mean)
    assert all(r["lr"] == 0.01 for r in doc["runs"])
