"""Time per step and peak memory of DDPNOpt beside torch's SGD / Adam and nn_adapter.EKFAC.

Two networks as in DDPNOpt's paper (Liu, Chen & Theodorou, ICLR 2021), and a residual one:
(a) a 5-layer MLP of width 32 (Tanh) on DIGITS, batch 32;
(b) the paper's CNN, 4 conv 3x3 with 32 channels (ReLU, 2x2 max-pooling after the 2nd and 4th)
    + 2 linear layers, on 28x28 inputs, batch 128: Fashion-MNIST when its IDX files are installed
    (/usr/share/datasets/fashion-mnist), else random inputs of the same shape (the output says so);
(c) a small residual CNN (nn_adapter.training.ResidualCNN: 3x3 stem conv to 32 channels, 3 blocks
    relu(x + conv(relu(conv(x)))), global average pooling, Linear to 10 classes), an nn.Module with
    its own forward, on random 32x32 inputs with 3 channels (CIFAR-like), batch 128. A DDPNOpt row
    with feedback that refuses the model (UnsupportedModuleError) prints "n/a (unsupported)".

"s=1" is DDPNOpt with ``vxx_update=False`` (V_xx = Q_xx: no per-sample quadratic forms
q_u^T P q_u and no per-sample regularisation).

All optimizers run side by side in one process, single-threaded, float32, interleaved step by
step (each step of every optimizer on the same minibatch, one after the other; the median over
the rounds' steps is reported), and a step's time is the CPU time of the process
(``time.process_time``: on one thread the wall time of an idle machine, without the time other
processes of a busy machine take), so the ratios are comparable even on a busy machine.
Peak memory of a step = parameters + gradients + optimizer state before the step + the peak of
the bytes the CPU allocator hands out during the step (torch.profiler memory events).

    python benchmarks/nn_step.py [--steps 20] [--rounds 5] [--quick] [--only mlp|cnn|resnet]

``--quick`` is a smoke test: 2 steps x 2 rounds; the residual CNN (at batch 128 about 0.5 s per
Adam step, 2.5 s per EKFAC step on one thread) runs batch 32, one warm-up step, 1 step x 1 round.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nn_adapter import EKFAC, DDPNOpt  # noqa: E402
from nn_adapter.cli import MAX_THREADS  # noqa: E402
from nn_adapter.data import load_digits, load_fashion_mnist  # noqa: E402
from nn_adapter.errors import UnsupportedModuleError  # noqa: E402
from nn_adapter.memory import resident_bytes, step_peak_bytes  # noqa: E402
from nn_adapter.training import make_closure, paper_cnn, residual_cnn  # noqa: E402
from occore.cli import OneLineParser  # noqa: E402

OPTIMIZERS = {
    "SGD-m (torch)": lambda net: torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
    "Adam (torch)": lambda net: torch.optim.Adam(net.parameters(), lr=1e-3),
    "EKFAC (ours)": lambda net: EKFAC(net, lr=0.01, eigen_update_freq=20),
    "DDPNOpt-identity fb=off": lambda net: DDPNOpt(net, lr=0.05, curvature="identity",
                                                   momentum=0.9, feedback=False),
    "DDPNOpt-identity fb=on": lambda net: DDPNOpt(net, lr=0.05, curvature="identity",
                                                  momentum=0.9),
    "DDPNOpt-adam fb=off": lambda net: DDPNOpt(net, lr=1e-3, curvature="adam", feedback=False),
    "DDPNOpt-adam fb=on": lambda net: DDPNOpt(net, lr=1e-3, curvature="adam"),
    "DDPNOpt-adam fb=on s=1": lambda net: DDPNOpt(net, lr=1e-3, curvature="adam",
                                                  vxx_update=False),
    "DDPNOpt-ekfac fb=off": lambda net: DDPNOpt(net, lr=0.01, curvature="ekfac",
                                                eigen_update_freq=20, feedback=False),
    "DDPNOpt-ekfac fb=on": lambda net: DDPNOpt(net, lr=0.01, curvature="ekfac",
                                               eigen_update_freq=20),
}
#: Rows allowed to refuse a model (DDPNOpt's feedback needs stages it can find): "n/a (unsupported)".
FEEDBACK_ROWS = frozenset(label for label in OPTIMIZERS if "fb=on" in label)
UNSUPPORTED = "n/a (unsupported)"


def mlp() -> nn.Module:
    layers, width = [], 64
    for _ in range(4):
        layers += [nn.Linear(width, 32), nn.Tanh()]
        width = 32
    return nn.Sequential(*layers, nn.Linear(32, 10))


cnn = paper_cnn
MODELS = {"mlp": mlp, "cnn": cnn, "resnet": residual_cnn}


def batches(name: str, batch: int, n: int):
    """``n`` minibatches and a note on where the data came from."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        data = load_digits()
        x, y, note = data.x_train, data.y_train, "DIGITS (scikit-learn)"
    elif name == "resnet":
        x = torch.rand(batch * n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch * n,), generator=g)
        note = "random 32x32 inputs with 3 channels (CIFAR-like; no data set is loaded)"
    else:
        try:
            data = load_fashion_mnist(limit=batch * n)
            x, y, note = data.x_train, data.y_train, "Fashion-MNIST"
        except FileNotFoundError:
            x = torch.rand(batch * n, 1, 28, 28, generator=g)
            y = torch.randint(0, 10, (batch * n,), generator=g)
            note = "random 28x28 inputs (Fashion-MNIST not installed)"
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out.append((x[idx], y[idx]))
    return out, note


def peak_step_bytes(net, opt, xb, yb) -> int:
    """Resident bytes before the step + peak of the bytes allocated during it (:mod:`nn_adapter.memory`)."""
    held = resident_bytes(net, opt)
    return held + step_peak_bytes(lambda: opt.step(make_closure(net, opt, xb, yb)), torch.device("cpu"))[1]


def bench(name: str, steps: int, rounds: int, batch: int, warmup: int = 2):
    """``{label: (median seconds per step, peak bytes)}`` (``None`` for a feedback row whose DDPNOpt
    refused the model), the data note and ``{label: reason}`` of the refusals."""
    torch.manual_seed(0)
    data, note = batches(name, batch, steps * rounds + warmup + 1)
    make = MODELS[name]
    runs, refused = {}, {}
    for label, factory in OPTIMIZERS.items():
        torch.manual_seed(0)
        net = make()
        try:
            opt = factory(net)
            for xb, yb in data[:warmup]:        # warm-up (and first eigendecompositions)
                opt.step(make_closure(net, opt, xb, yb))
        except UnsupportedModuleError as err:
            if label not in FEEDBACK_ROWS:
                raise
            refused[label] = str(err)
            continue
        runs[label] = (net, opt, [])
    for xb, yb in data[warmup:warmup + steps * rounds]:
        for label, (net, opt, times) in runs.items():
            t0 = time.process_time()
            opt.step(make_closure(net, opt, xb, yb))
            times.append(time.process_time() - t0)
    result = {}
    xb, yb = data[-1]
    for label in OPTIMIZERS:
        if label in runs:
            net, opt, times = runs[label]
            result[label] = (statistics.median(times), peak_step_bytes(net, opt, xb, yb))
        else:
            result[label] = None
    return result, note, refused


def report(title: str, result, note: str, refused=None) -> dict:
    t_adam, m_adam = result["Adam (torch)"]
    print(f"\n{title}\n  data: {note}")
    print(f"  {'optimizer':26s} {'ms/step':>9s} {'x Adam':>7s} {'peak MiB':>9s} {'x Adam':>7s}")
    for label, row in result.items():
        if row is None:
            print(f"  {label:26s} {UNSUPPORTED:>9s}")
            continue
        t, m = row
        print(f"  {label:26s} {1e3 * t:9.2f} {t / t_adam:7.2f} {m / 2**20:9.2f} {m / m_adam:7.2f}")
    refused = refused or {}
    for reason in dict.fromkeys(refused.values()):     # one line per distinct reason
        labels = ", ".join(label for label, r in refused.items() if r == reason)
        print(f"  {UNSUPPORTED}: {labels}: UnsupportedModuleError: {reason.split('. ')[0]}")
    ratios = {}
    for label in ("DDPNOpt-adam fb=on", "DDPNOpt-adam fb=on s=1"):
        if result[label] is None:
            ratios[label] = None
            print(f"  {label} / Adam: {UNSUPPORTED}")
            continue
        t, m = result[label]
        r = ratios[label] = {"time": t / t_adam, "memory": m / m_adam}
        verdict = "OK" if r["time"] <= 1.5 and r["memory"] <= 1.3 else "OVER"
        print(f"  {label} / Adam: time {r['time']:.2f}x (target <= 1.5), peak memory "
              f"{r['memory']:.2f}x (target <= 1.3): {verdict}")
    return ratios


def main(argv=None) -> dict:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per optimizer and round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (steps x rounds steps each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="2 steps x 2 rounds; the residual CNN batch 32, 1 step x 1 round (smoke test)")
    ap.add_argument("--only", choices=tuple(MODELS), help="run one network only")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    if not 1 <= args.threads <= MAX_THREADS:
        ap.error(f"--threads {args.threads}: expected an integer from 1 to {MAX_THREADS}")
    if args.quick:
        args.steps, args.rounds = 2, 2
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, "
          f"{args.steps} steps x {args.rounds} rounds per optimizer, interleaved step by step, "
          "median CPU time per step")
    print("fb = DDPNOpt's layer-wise feedback; s=1: vxx_update=False (V_xx = Q_xx). Peak memory: "
          "parameters, gradients and optimizer state + the peak allocated during one step.")
    out = {}
    if args.only in (None, "mlp"):
        res, note, refused = bench("mlp", args.steps, args.rounds, 32)
        out["mlp"] = report("(a) MLP 5 x Linear (width 32, Tanh) on DIGITS, batch 32", res, note, refused)
    if args.only in (None, "cnn"):
        res, note, refused = bench("cnn", args.steps, args.rounds, 128)
        out["cnn"] = report("(b) CNN 4 x Conv2d(3x3, 32) + 2 x Linear on 28x28, batch 128",
                            res, note, refused)
    if args.only in (None, "resnet"):
        steps, rounds, warmup, batch = (1, 1, 1, 32) if args.quick else (args.steps, args.rounds, 2, 128)
        res, note, refused = bench("resnet", steps, rounds, batch, warmup)
        out["resnet"] = report(f"(c) residual CNN: Conv2d(3x3, 32) + 3 residual blocks + avg pool + Linear on "
                               f"32x32x3, batch {batch}{' (--quick: 1 step x 1 round)' if args.quick else ''}",
                               res, note, refused)
    return out


if __name__ == "__main__":
    main()
