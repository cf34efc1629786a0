"""Issue 13, class 5 (nn_adapter side): the library never prints; its loggers (and occore's)
have a NullHandler; a refused step or a guessed loss warns once, through ``warnings`` only."""
import logging
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import occore
from nn_adapter import EKFAC, DDPNOpt, MMCLoss, NetworkProblem

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["nn_adapter", "occore"])
def test_both_package_loggers_have_a_null_handler(name):
    __import__(name)
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger(name).handlers)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _batches(n=4, b=8):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n)]


def _train(opt, net, batches, loss_fn=nn.functional.cross_entropy):
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)


def test_training_loops_and_solves_print_nothing_and_warn_nothing(capfd, caplog):
    """A DDPNOpt loop (each curvature, each feedback mode), an EKFAC loop, closure-free steps and
    NetworkProblem solves with DDP, iLQR and E-MSA write nothing to stdout or stderr, warn
    nothing and log nothing at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    batches = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for curvature in ("identity", "rmsprop", "adam", "ekfac"):
            for feedback in (True, False, "dense"):
                net = _net()
                _train(DDPNOpt(net, lr=0.01, curvature=curvature, feedback=feedback), net,
                       batches[:2])
        net = _net()
        _train(EKFAC(net, lr=0.05), net, batches)
        opt = EKFAC(net, lr=0.05)
        for x, y in batches[:2]:                  # closure-free steps
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        net = _net()
        _train(DDPNOpt(net, lr=0.01, loss="mse"), net,
               [(x, torch.randn(8, 3)) for x, _ in batches[:2]], nn.functional.mse_loss)
        x, y = batches[0]
        prob = NetworkProblem(_net(), nn.CrossEntropyLoss(), x, y)
        for solver in (occore.DDP(max_iter=3), occore.ILQR(max_iter=3), occore.EMSA(max_iter=3)):
            res = solver.solve(prob)
            assert math.isfinite(res.cost)
        NetworkProblem(_net(), MMCLoss(3, 3), x, y)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def _refused_step(opt, net):
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) * math.inf
        loss.backward()
        return loss
    return opt.step(closure)


@pytest.mark.parametrize("make", [lambda n: DDPNOpt(n, lr=0.1), lambda n: EKFAC(n),
                                  lambda n: DDPNOpt(n, lr=0.1, feedback=False)],
                         ids=["ddpnopt", "ekfac", "ddpnopt-no-feedback"])
def test_a_refused_step_warns_once_and_is_not_also_logged(make, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    net = _net()
    opt = make(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _refused_step(opt, net)
    assert [str(w.message).split(":")[0] for w in caught] == [type(opt).__name__]
    assert "step refused" in str(caught[0].message)
    assert [r for r in caplog.records if "refused" in r.getMessage()] == []
    assert capfd.readouterr() == ("", "")


def test_captured_warnings_reach_the_logs_once():
    """With ``logging.captureWarnings(True)`` the application sees the refused step exactly once
    in its logs."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    handler = Keep()
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            net = _net()
            _refused_step(DDPNOpt(net, lr=0.1), net)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
    assert len([m for m in records if "step refused" in m]) == 1


def test_the_guessed_loss_warns_once_per_optimizer(caplog):
    caplog.set_level(logging.DEBUG)
    net = _net()
    opt = DDPNOpt(net, lr=0.01)                       # loss="auto" meets a non-cross-entropy loss
    batches = [(x, torch.randn(8, 3)) for x, _ in _batches(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(opt, net, batches, nn.functional.mse_loss)
    assert len(caught) == 1 and "mean squared error" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert [r for r in caplog.records if "mean squared error" in r.getMessage()] == []


def test_in_a_fresh_interpreter_nothing_reaches_stdout_or_stderr():
    """Without any logging configuration (where Python's last-resort handler would print a
    WARNING record of a logger without handlers) and with warnings ignored, training, a refused
    step, a solve and a warning logged by the library print nothing."""
    script = textwrap.dedent("""
        import logging, math, torch
        from torch import nn
        import occore
        from nn_adapter import DDPNOpt, EKFAC, NetworkProblem
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        for opt in (DDPNOpt(net, lr=0.01), EKFAC(net, lr=0.05)):
            for scale in (1.0, math.nan, 1.0):
                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(x), y) * scale
                    loss.backward()
                    return loss
                opt.step(closure)
            assert opt.refused_steps == 1
        res = occore.DDP(max_iter=2).solve(NetworkProblem(net, nn.CrossEntropyLoss(), x, y))
        assert math.isfinite(res.cost)
        logging.getLogger("nn_adapter.ddpnopt").warning("a library warning record")
        logging.getLogger("occore.solvers").warning("a library warning record")
    """)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
