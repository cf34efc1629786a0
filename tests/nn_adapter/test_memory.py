"""nn_adapter.memory: the step-memory probe behind occore train's table and the benchmarks."""
import pytest
import torch
from torch import nn

from nn_adapter import data
from nn_adapter.memory import resident_bytes, step_peak_bytes
from nn_adapter.training import train_classifier

CPU = torch.device("cpu")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 10), nn.Tanh(), nn.Linear(10, 3))


def test_resident_bytes_counts_parameters_gradients_and_state_once():
    net = _net()
    n = sum(p.numel() for p in net.parameters())
    assert resident_bytes(net) == 4 * n
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 13)).sum().backward()
    opt.step()
    steps = sum(st["step"].untyped_storage().nbytes() for st in opt.state.values())
    # parameters + gradients + exp_avg + exp_avg_sq + the step counters
    assert resident_bytes(net, opt) == 4 * 4 * n + steps
    # a gradient that is a view of a parameter's storage is not counted twice
    for p in net.parameters():
        p.grad = p.detach()
    assert resident_bytes(net) == 4 * n


@pytest.mark.parametrize("call,error,words", [
    (lambda: resident_bytes(None), TypeError, "model: expected a torch.nn.Module, got NoneType"),
    (lambda: step_peak_bytes(3, CPU), TypeError, "fn: expected a callable"),
    (lambda: step_peak_bytes(lambda: 1, "gpu"), ValueError, "device='gpu': expected a torch.device"),
    (lambda: step_peak_bytes(lambda: 1, [0]), ValueError, r"device=\[0\]"),
])
def test_the_memory_helpers_refuse_bad_arguments_by_name(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_step_peak_bytes_sees_simultaneous_not_sequential_allocations():
    mib = 2 ** 20

    def sequential():
        for _ in range(3):
            t = torch.empty(mib, dtype=torch.uint8)
            t.fill_(1)
            del t
        return 7

    def together():
        ts = [torch.empty(mib, dtype=torch.uint8) for _ in range(3)]
        return len(ts)

    out, one = step_peak_bytes(sequential, CPU)
    assert out == 7 and mib <= one < 2 * mib
    out, three = step_peak_bytes(together, CPU)
    assert out == 3 and 3 * mib <= three < 4 * mib


def test_train_classifier_memory_is_one_probed_step_repeatable_and_untimed():
    split = data.load("wine")
    recs = {}
    for name, make in (("sgd", lambda p: torch.optim.SGD(p, lr=0.01)),
                       ("adam", lambda p: torch.optim.Adam(p, lr=1e-3)), ("adam2", None)):
        net = _net()
        opt = make(net.parameters()) if make else torch.optim.Adam(net.parameters(), lr=1e-3)
        recs[name] = train_classifier(net, split, opt, epochs=2, batch_size=32, seed=0,
                                      measure_memory=True)
    n = sum(p.numel() for p in _net().parameters())
    for r in recs.values():
        assert r.untimed_steps == 1 and r.steps == 10
        assert r.seconds_per_step == r.seconds / 9
    # SGD holds parameters and gradients; Adam also its two moments: at least 2 * 4n bytes more
    assert recs["sgd"].peak_memory > 2 * 4 * n
    assert recs["adam"].peak_memory - recs["sgd"].peak_memory >= 2 * 4 * n
    # the same run measures the same bytes (the resident set size did not: reuse of freed memory)
    assert recs["adam"].peak_memory == recs["adam2"].peak_memory
    net = _net()
    plain = train_classifier(net, split, torch.optim.SGD(net.parameters(), lr=0.01), 2, 32, 0)
    assert plain.peak_memory is None and plain.untimed_steps == 0


@pytest.mark.parametrize("replaced", [False, True])
def test_the_probe_keeps_the_profilers_chatter_off_stderr_and_passes_the_rest_on(replaced):
    """Also when sys.stderr is not the process's descriptor 2 (captured in a StringIO, as
    notebooks and test runners do): the profiler writes on descriptor 2 all the same."""
    import os
    import subprocess
    import sys

    code = ("import io, os, sys, torch\n"
            "from nn_adapter.memory import step_peak_bytes\n"
            + ("sys.stderr = io.StringIO()\n" if replaced else "") +
            "def f():\n"
            "    print('from the step', file=sys.stderr)\n"
            "    os.write(2, b'from C\\n')\n"
            "    return torch.zeros(256)\n"
            "peak = step_peak_bytes(f, torch.device('cpu'))[1]\n"
            "if isinstance(sys.stderr, io.StringIO):\n"
            "    sys.__stderr__.write(sys.stderr.getvalue())\n"
            "print(peak)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 1024
    assert sorted(done.stderr.split("\n")) == ["", "from C", "from the step"], done.stderr


def test_the_probe_counts_the_steps_own_blocks_not_frees_of_older_ones():
    # a block allocated inside an earlier probe (so the profiler knows its size) and freed
    # inside this one does not lower this step's count
    held, first = step_peak_bytes(lambda: [torch.zeros(4096)], torch.device("cpu"))
    assert first >= 4 * 4096

    def step():
        held.pop()
        return torch.zeros(256)             # 1 KiB

    out, peak = step_peak_bytes(step, torch.device("cpu"))
    assert out.numel() == 256
    assert 1024 <= peak < 4 * 4096
