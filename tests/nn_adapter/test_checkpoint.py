"""Checkpoints: a run killed (SIGKILL) after an epoch and resumed ends with exactly the parameters
of an uninterrupted run; bad checkpoints (missing, corrupted, truncated, of another model or
optimizer) are typed errors naming the file and change nothing; a failed write never replaces a
good checkpoint."""
import copy
import os
import pathlib
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint_run
import occore
from nn_adapter import DDPNOpt, EKFAC
from nn_adapter import checkpoint as ckpt
from nn_adapter.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nn_adapter.training import make_closure

SCRIPT = pathlib.Path(checkpoint_run.__file__)
EPOCHS, KILL_AFTER = 60, 2


@pytest.fixture
def own_rng():
    """The RNG states and thread count of this process, restored after the test."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    threads = torch.get_num_threads()
    yield
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    torch.set_num_threads(threads)


def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path, own_rng):
    folder = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed_at = checkpoint_run.kill_after([sys.executable, str(SCRIPT), str(folder), str(EPOCHS)], env,
                                          folder / ckpt.FILE_NAME, KILL_AFTER)
    print("killed after epoch", killed_at)
    assert KILL_AFTER <= killed_at < EPOCHS and not (folder / "final.npy").exists()
    resumed = checkpoint_run.train(folder, EPOCHS, resume=True)
    torch.manual_seed(1234)                      # the RNG states come from the checkpoint
    uninterrupted = checkpoint_run.train(tmp_path / "whole", EPOCHS)
    assert np.array_equal(resumed, uninterrupted)


def _setup(width=5, curvature="adam", **options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
    return net, DDPNOpt(net, lr=0.01, curvature=curvature, **options)


def _step(net, opt):
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))

    opt.step(make_closure(net, opt, x, y))


@pytest.fixture
def saved(tmp_path, own_rng):
    net, opt = _setup()
    _step(net, opt)
    save_checkpoint(tmp_path, net, opt, epoch=3, data_order=torch.Generator().manual_seed(1),
                    extra={"loss": [1.0, 0.5]})
    return tmp_path


def _flat(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()


def test_a_checkpoint_round_trip_restores_everything(saved, own_rng):
    torch.manual_seed(99)
    net, opt = _setup()
    order = torch.Generator()
    state = load_checkpoint(saved, net, opt, order)
    assert (state.epoch, state.world_size, state.extra) == (3, 1, {"loss": [1.0, 0.5]})
    assert torch.equal(order.get_state(), torch.Generator().manual_seed(1).get_state())
    assert opt.state_dict()["state"][0]["step"] == 1
    assert state.path == str(saved / ckpt.FILE_NAME)


def _refused(path, net, opt, match):
    before = _flat(net)
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path, net, opt)
    assert str(path) in str(err.value)
    assert torch.equal(_flat(net), before)                 # nothing changed
    assert str(opt.state_dict()["state"]) == str(opt_before["state"])


@pytest.mark.parametrize("other", [
    dict(width=6), dict(curvature="ekfac"), dict(feedback=False), dict(terminal_hessian="sampled"),
    dict(betas=(0.8, 0.999))])
def test_a_checkpoint_of_another_model_or_optimizer_is_refused(saved, other):
    net, opt = _setup(**other)
    _refused(saved / ckpt.FILE_NAME, net, opt, "another model or optimizer configuration")


def test_check_extra_sees_the_saved_extra_before_the_configuration_is_compared(saved):
    """A run's own check of its saved settings decides first (its message, not the shapes of a
    model those settings imply), and a refusal changes nothing."""
    net, opt = _setup(width=6)              # another model: the configuration would differ too
    seen = []

    def check(path, extra):
        seen.append((path, extra))
        raise CheckpointError(path, "written by a run with other settings")
    _refused(saved / ckpt.FILE_NAME, net, opt, "another model or optimizer configuration")
    before = _flat(net)
    with pytest.raises(CheckpointError, match="other settings"):
        load_checkpoint(saved, net, opt, check_extra=check)
    assert len(seen) == 1 and str(seen[0][0]).endswith(ckpt.FILE_NAME)
    assert torch.equal(_flat(net), before)
    net, opt = _setup()
    extras = []
    state = load_checkpoint(saved, net, opt, check_extra=lambda path, extra: extras.append(extra))
    assert extras == [state.extra]


def test_a_checkpoint_of_another_optimizer_class_is_refused(saved):
    net, _ = _setup()
    _refused(saved, net, EKFAC(net, lr=0.01), "class")
    _refused(saved, net, torch.optim.Adam(net.parameters()), "class")


def test_corrupted_truncated_and_missing_checkpoints_are_typed_errors_naming_the_file(saved):
    path = saved / ckpt.FILE_NAME
    net, opt = _setup()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, net, opt, "corrupted or truncated")
    path.write_bytes(b"not a checkpoint at all")
    _refused(path, net, opt, "corrupted or truncated")
    torch.save({"some": "dict"}, path)
    _refused(path, net, opt, "entries missing")
    path.unlink()
    _refused(saved, net, opt, "does not exist")


def test_a_failed_write_leaves_the_good_checkpoint(saved, monkeypatch):
    path = saved / ckpt.FILE_NAME
    good = path.read_bytes()

    def broken(obj, fh):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.torch, "save", broken)
    net, opt = _setup()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, net, opt, epoch=4)
    assert path.read_bytes() == good
    assert [p.name for p in saved.iterdir()] == [ckpt.FILE_NAME]


def test_save_refuses_bad_arguments_before_writing(tmp_path):
    net, opt = _setup()
    with pytest.raises(ValueError, match="epoch"):
        save_checkpoint(tmp_path, net, opt, epoch=-1)
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(tmp_path, net, net, epoch=1)
    with pytest.raises(TypeError, match="data_order"):
        save_checkpoint(tmp_path, net, opt, epoch=1, data_order=3)
    with pytest.raises(TypeError, match="model"):
        load_checkpoint(tmp_path, opt, opt)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,words", [
    (np.arange(3), "numpy"), ({"loss": [np.float64(0.5)]}, "numpy"), (object(), "object"),
    (lambda: 1, "function")])
def test_save_refuses_an_extra_that_would_not_load_back(tmp_path, extra, words):
    """load_checkpoint reads with weights_only=True: a checkpoint whose extra it cannot read
    would be written and then refused as corrupted on resume."""
    net, opt = _setup()
    with pytest.raises(TypeError, match=f"extra: expected tensors.*{words}"):
        save_checkpoint(tmp_path, net, opt, epoch=1, extra=extra)
    assert not list(tmp_path.iterdir())
    kept = {"loss": [1.0, float("inf")], "w": torch.ones(2), "name": "x", "pair": (1, None)}
    save_checkpoint(tmp_path, net, opt, epoch=1, extra=kept)
    assert str(load_checkpoint(tmp_path, net, opt).extra) == str(kept)


@pytest.mark.parametrize("kwargs,words", [
    (dict(data_order=3), "data_order: expected a torch.Generator"),
    (dict(check_extra="yes"), "check_extra: expected None or a callable"),
    (dict(directory=None), "directory: expected a folder"),
])
def test_load_refuses_bad_arguments_before_changing_anything(saved, kwargs, words):
    net, opt = _setup()
    before, opt_before = _flat(net), copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match=words):
        load_checkpoint(kwargs.pop("directory", saved), net, opt, **kwargs)
    assert torch.equal(_flat(net), before)
    assert str(opt.state_dict()) == str(opt_before)


@pytest.mark.parametrize("where", ["notes", "notes/run"])
def test_save_into_a_folder_that_is_a_file_is_a_checkpoint_error(tmp_path, where):
    (tmp_path / "notes").write_text("mine")
    net, opt = _setup()
    with pytest.raises(CheckpointError, match="is not a folder") as err:
        save_checkpoint(tmp_path / where, net, opt, epoch=1)
    assert err.value.path == str(tmp_path / where)
    assert (tmp_path / "notes").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_a_data_order_asked_of_a_checkpoint_without_one_is_refused(tmp_path):
    net, opt = _setup()
    save_checkpoint(tmp_path, net, opt, epoch=1)
    with pytest.raises(CheckpointError, match="no data order"):
        load_checkpoint(tmp_path, net, opt, torch.Generator())


def test_the_checkpoint_carries_the_generator_of_the_sampled_terminal(tmp_path, own_rng):
    net, opt = _setup(terminal_hessian="sampled")
    _step(net, opt)
    save_checkpoint(tmp_path, net, opt, epoch=1)
    twin_net, twin = _setup(terminal_hessian="sampled")
    load_checkpoint(tmp_path, twin_net, twin)
    assert torch.equal(twin.generator.get_state(), opt.generator.get_state())
    torch.manual_seed(5)
    _step(net, opt)
    torch.manual_seed(5)
    _step(twin_net, twin)
    assert torch.equal(_flat(net), _flat(twin_net))


def _net(width=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()


OPTIMIZERS = {   # each builds the same configuration for any net of the same shapes
    "sgd": lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
    "adam-subset": lambda net: torch.optim.Adam(net[2].parameters()),
    "ddpnopt": lambda net: DDPNOpt(net, lr=0.01, curvature="adam"),
    "ddpnopt-model-groups": lambda net: DDPNOpt([{"params": net[0].parameters()},
                                                 {"params": net[2].parameters(), "lr": 0.02}],
                                                model=net, lr=0.01),
    "ekfac": lambda net: EKFAC(net, lr=0.01),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path, own_rng, kind):
    """An optimizer built over another model of the same shapes fits the saved configuration, but
    training would update the other model's tensors: refused, naming ``optimizer``, before the file
    is read (nothing loaded) or written; over this model's parameters it resumes."""
    net = _net()
    opt = OPTIMIZERS[kind](net)
    _step(net, opt)
    save_checkpoint(tmp_path, net, opt, epoch=2, data_order=torch.Generator().manual_seed(3))
    good = (tmp_path / ckpt.FILE_NAME).read_bytes()
    fresh, other = _net(), _net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    foreign = OPTIMIZERS[kind](other)
    before, foreign_before = _flat(fresh), copy.deepcopy(foreign.state_dict())
    order = torch.Generator().manual_seed(7)
    with pytest.raises(occore.InputError, match=r"^optimizer: its parameters are not the model's: "
                                                r"\d+ of the \d+ tensors it updates are not parameters of model"):
        load_checkpoint(tmp_path, fresh, foreign, order)
    assert torch.equal(_flat(fresh), before) and torch.equal(order.get_state(), torch.Generator().manual_seed(7).get_state())
    assert str(foreign.state_dict()) == str(foreign_before)
    with pytest.raises(occore.InputError, match="^optimizer: its parameters are not the model's"):
        save_checkpoint(tmp_path, fresh, foreign, epoch=3)
    assert (tmp_path / ckpt.FILE_NAME).read_bytes() == good
    own = OPTIMIZERS[kind](fresh)                # the same kind over the model's own parameters
    assert load_checkpoint(tmp_path, fresh, own).epoch == 2
    assert torch.equal(_flat(fresh), _flat(net))


def test_one_foreign_tensor_among_the_models_parameters_is_named(tmp_path):
    net = _net()
    stray = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([{"params": list(net.parameters())}, {"params": [stray]}], lr=0.1)
    with pytest.raises(occore.InputError, match=r"1 of the 5 tensors .* param_groups\[1\]\['params'\]\[0\], "
                                                r"shape \(4, 2\)"):
        save_checkpoint(tmp_path / "run", net, opt, epoch=1)
    assert not list(tmp_path.iterdir())
