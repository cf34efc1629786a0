"""nn_adapter.training and `occore train`."""
import copy

import pytest
import torch

from nn_adapter import cli, data
from nn_adapter.networks import mlp
from nn_adapter.training import compare_optimizers, make_optimizer, train_classifier


@pytest.fixture(scope="module")
def wine():
    return data.load_wine(dtype=torch.float64)


def test_training_loop_lowers_the_loss_and_records_every_epoch(wine):
    torch.manual_seed(0)
    model = mlp(13, 3, width=8, depth=2).double()
    rec = train_classifier(model, wine, make_optimizer("adam", model, 0.01), epochs=3, batch_size=16)
    assert len(rec.train_loss) == len(rec.test_accuracy) == 3
    assert rec.train_loss[-1] < rec.train_loss[0] and rec.test_accuracy[-1] > 0.8 and rec.seconds > 0


def test_same_start_and_minibatches_for_every_optimizer(wine):
    """DDPNOpt without feedback is Adam: the comparison harness must then report identical runs."""
    make = lambda: mlp(13, 3, width=8, depth=2).double()  # noqa: E731
    torch.manual_seed(0)
    init = make()
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    from nn_adapter import DDPNOpt

    ra = train_classifier(a, wine, torch.optim.Adam(a.parameters(), lr=1e-2), epochs=2, batch_size=16)
    rb = train_classifier(b, wine, DDPNOpt(b, lr=1e-2, curvature="adam", feedback=False), epochs=2, batch_size=16)
    assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-12)
    recs = compare_optimizers(make, wine, ["adam", "sgd"], epochs=2, batch_size=16)
    assert list(recs) == ["adam", "sgd"] and all(len(r.train_loss) == 2 for r in recs.values())
    assert recs["adam"].train_loss != recs["sgd"].train_loss


def test_test_accuracy_is_measured_in_eval_mode_and_the_modes_are_restored():
    """Dropout off and batch norm on its running statistics while the test split is scored (the
    test data does not advance them: num_batches_tracked counts the steps only); every
    submodule's own mode comes back, a batch norm the user froze in eval mode included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    y = (x[:, 0] > 0).long()
    split = data.Split(x[:30], y[:30], x[30:] + 3.0, y[30:])   # test data far from the training
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(16, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 2))
    model[5].eval()                                   # frozen by the user
    refs = []

    def reference(epoch, record):
        ref = copy.deepcopy(model).eval()
        with torch.no_grad():
            refs.append(float((ref(split.x_test).argmax(1) == split.y_test).float().mean()))
        assert model.training and model[1].training and model[3].training and not model[5].training
    rec = train_classifier(model, split, make_optimizer("adam", model), epochs=3, batch_size=10,
                           on_epoch_end=reference)
    assert rec.test_accuracy == refs
    assert int(model[1].num_batches_tracked) == rec.steps == 9
    assert int(model[5].num_batches_tracked) == 0


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ddpnopt.*adam"):
        make_optimizer("lbfgs", mlp(2, 2))
    assert cli.main(["--optimizers", "adamw"]) == 2


def test_cli_trains_and_plots(tmp_path, capsys):
    png = tmp_path / "train.png"
    assert cli.main(["--dataset", "wine", "--optimizers", "ddpnopt,sgd", "--epochs", "2", "--depth", "2",
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ddpnopt" in out and "sgd" in out and "test acc" in out
    assert png.stat().st_size > 1000


def test_every_train_option_has_help_and_no_raw_markup():
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.dest
    text = parser.format_help()
    assert "`" not in text and "%(" not in text and "**" not in text, text


@pytest.mark.parametrize("solver", ["emsa", "ddp"])
def test_solver_optimizer_state_dict_resumes_exactly(wine, solver):
    """SolverOptimizer.state_dict carries mu (E-MSA's rho) through torch.save /
    torch.load(weights_only=True): a run resumed on a fresh model and optimizer equals the
    uninterrupted one; for DDP, whose mu has grown by then, a resumed run without it differs."""
    import io

    from nn_adapter.training import SolverOptimizer

    lr = 0.1 if solver == "emsa" else 1.0
    batches = [(wine.x_train[i:i + 8], wine.y_train[i:i + 8]) for i in range(0, 128, 8)]
    loss_fn = torch.nn.CrossEntropyLoss()
    torch.manual_seed(0)
    net = mlp(13, 3, width=4, depth=1).double()
    fresh = copy.deepcopy(net)
    opt = SolverOptimizer(net, solver, lr)
    for x, y in batches[:12]:
        opt.step_batch(x, y, loss_fn)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in batches[12:]:
        opt.step_batch(x, y, loss_fn)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["solver"] == solver and saved["opt"]["mu"] is not None
    runs = []
    for load in (True, False):
        model = copy.deepcopy(fresh)
        model.load_state_dict(saved["model"])
        resumed = SolverOptimizer(model, solver, lr)
        if load:
            resumed.load_state_dict(saved["opt"])
        for x, y in batches[12:]:
            resumed.step_batch(x, y, loss_fn)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    done = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.equal(runs[0], done)
    if solver == "ddp":
        assert saved["opt"]["mu"] > 1e-6
        assert (runs[1] - done).abs().max() > 1e-6


def test_solver_optimizer_refuses_what_it_does_not_support():
    import occore
    from nn_adapter.training import SolverOptimizer

    net = mlp(13, 3, width=4, depth=1).double()
    emsa = SolverOptimizer(net, "emsa", 0.1)
    for call in (emsa.step, emsa.zero_grad):
        with pytest.raises(TypeError, match="step_batch"):
            call()
    with pytest.raises(ValueError, match="'emsa'.*'ddp'"):
        SolverOptimizer(net, "ddp").load_state_dict(emsa.state_dict())
    with pytest.raises(ValueError, match="'DDP'"):
        SolverOptimizer(net, occore.DDP()).load_state_dict(emsa.state_dict())
    with pytest.raises(ValueError, match="lr"):
        SolverOptimizer(net, "ddp").load_state_dict({"solver": "ddp", "lr": 2.0, "mu": None})
    with pytest.raises(ValueError, match="mu"):
        emsa.load_state_dict({"solver": "emsa", "lr": 0.1, "mu": float("nan")})
    with pytest.raises(TypeError, match="state_dict"):
        emsa.load_state_dict({"state": {}, "param_groups": []})
    assert emsa.mu is None and emsa.lr == 0.1
    emsa.load_state_dict({"solver": "emsa", "lr": 0.5, "mu": 0.0})     # rho 0 is a valid rho
    assert emsa.mu == 0.0 and emsa.lr == 0.5
