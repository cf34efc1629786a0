"""Vanishing gradients (the DDPNOpt paper's Figure 6; Liu, Chen & Theodorou, ICLR 2021): a deep
sigmoid MLP on DIGITS trained by SGD, EKFAC and DDPNOpt (Adam curvature, ``second_order=True``),
and by Adam (DDPNOpt without its feedback, to see what the feedback itself adds), and DDPNOpt on
SGD's curvature (identity, second order: does its feedback still move the weights where the
gradient vanishes?),
with cross-entropy and with the Max-Mahalanobis center (MMC) loss; training curves and the norm
of every layer's update.

Network: ``nn_adapter.networks.sigmoid_mlp`` (10 linear layers of width 32, Sigmoid between
them, torch's default initialisation). Learning rates: each optimizer's default
(``nn_adapter.training.DEFAULT_LR``; the paper gives none), the same for both losses. DDPNOpt
with MMC is told the terminal curvature is a squared error's (``loss="mse"``). The paper's
baseline SGD-VGR (SGD with a vanishing-gradient regulariser) is plain SGD here.

    python benchmarks/paper/vanishing.py --quick     # 512 samples, 2 epochs (< 1 minute)
    python benchmarks/paper/vanishing.py             # all 1438 training samples, 20 epochs

Writes docs/results/vanishing_<mode>.md, .json and .png.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from common import figure, header, output_folder, save_figure

import torch
from torch import nn

from nn_adapter import DDPNOpt, MMCLoss, data
from nn_adapter.data import batch_indices
from nn_adapter.networks import sigmoid_mlp
from nn_adapter.training import DEFAULT_LR, make_closure, make_optimizer
from occore.cli import OneLineParser  # noqa: E402

#: adam is the control: DDPNOpt's curvature without the feedback (what the feedback adds);
#: ddpnopt-sgd-2nd is DDPNOpt on SGD's curvature (identity, no momentum, SGD's lr), second order:
#: where the gradient vanishes, does the feedback K dx still move the weights?
OPTIMIZERS = ["sgd", "ekfac", "adam", "ddpnopt-2nd", "ddpnopt-sgd-2nd"]
LR = dict(DEFAULT_LR, **{"ddpnopt-sgd-2nd": DEFAULT_LR["sgd"]})


def _optimizer(name, model, loss_name):
    if name.startswith("ddpnopt"):   # with diagnostics: the feedback's size relative to k per stage
        return DDPNOpt(model, lr=LR[name], curvature="identity" if "sgd" in name else "adam",
                       second_order=True, diagnostics=True, loss="mse" if loss_name == "mmc" else "cross_entropy")
    return make_optimizer(name, model)


def train(name, loss_name, split, epochs, batch):
    torch.manual_seed(0)
    model = sigmoid_mlp(split.input_shape, 10)
    loss_fn = MMCLoss(10, 10) if loss_name == "mmc" else nn.CrossEntropyLoss()
    predict = loss_fn.predict if loss_name == "mmc" else (lambda z: z.argmax(1))
    opt = _optimizer(name, model, loss_name)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    gen = torch.Generator().manual_seed(0)
    losses, accs, norms = [], [], []          # norms: per epoch, mean over steps, per layer
    ratios = []                               # DDPNOpt: ||feedback|| / ||k|| per stage, last epoch
    for _ in range(epochs):
        epoch_losses, epoch_norms, ratios = [], [], []
        for idx in batch_indices(len(split.x_train), batch, gen):
            before = [m.weight.detach().clone() for m in layers]
            loss = opt.step(make_closure(model, opt, split.x_train[idx], split.y_train[idx], loss_fn))
            epoch_losses.append(float(loss.detach()))
            epoch_norms.append([float((m.weight.detach() - w).norm()) for m, w in zip(layers, before)])
            if getattr(opt, "diagnostics", None):
                ratios.append([float(st["ratio"]) for st in opt.diagnostics])
        losses.append(statistics.fmean(epoch_losses))
        norms.append([statistics.fmean(col) for col in zip(*epoch_norms)])
        with torch.no_grad():
            accs.append(float((predict(model(split.x_test)) == split.y_test).float().mean()))
    feedback = [statistics.fmean(col) for col in zip(*ratios)] if ratios else None
    return {"train_loss": losses, "test_accuracy": accs, "update_norms": norms, "feedback_ratio": feedback}


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 training samples, 2 epochs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    epochs = 2 if args.quick else 20
    split = data.load("digits", n_train=512 if args.quick else None)
    out = output_folder(ap, args.out)
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = {f"{n}/{l}": train(n, l, split, epochs, 32) for l in ("ce", "mmc") for n in OPTIMIZERS}
    lines = ["# Vanishing gradients: 10-layer sigmoid MLP on DIGITS\n", header(argv, mode, time.perf_counter() - start),
             f"{len(split.x_train)} training / {len(split.x_test)} test samples, batch 32, {epochs} epochs; "
             "update norm = Frobenius norm of a layer's weight change in one step, mean over the last epoch's steps; "
             "feedback / k = DDPNOpt's ||P Q_ux dx|| / ||k|| per stage (its diagnostics), mean over the last epoch. "
             "Adam is DDPNOpt's curvature without the feedback.\n",
             "| optimizer / loss | lr | first-epoch loss | last-epoch loss | test acc [%] | update norm, layer 1 | "
             "layer 5 | layer 10 | layer 1 vs SGD | feedback / k, max over layers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in res.items():
        n, l = key.split("/")
        un = r["update_norms"][-1]
        ratio = un[0] / max(res[f"sgd/{l}"]["update_norms"][-1][0], 1e-30)
        lines.append(f"| {key} | {LR[n]:.2g} | {r['train_loss'][0]:.4f} | {r['train_loss'][-1]:.4f} | "
                     f"{100 * r['test_accuracy'][-1]:.1f} | {un[0]:.2e} | {un[4]:.2e} | {un[-1]:.2e} | {ratio:.3g}x | "
                     f"{'-' if r['feedback_ratio'] is None else format(max(r['feedback_ratio']), '.3f')} |")
    text = "\n".join(lines) + "\n"
    (out / f"vanishing_{mode}.md").write_text(text)
    (out / f"vanishing_{mode}.json").write_text(json.dumps(res, indent=1))
    fig, axes = figure(2, 2, (11, 7))
    for row, l in enumerate(("ce", "mmc")):
        for n in OPTIMIZERS:
            r = res[f"{n}/{l}"]
            axes[row, 0].plot(range(1, epochs + 1), r["train_loss"], "o-", label=n)
            axes[row, 1].semilogy(range(1, 11), r["update_norms"][-1], "o-", label=n)
        axes[row, 0].set(xlabel="epoch", ylabel="mean training loss", title=f"training loss ({l.upper()})")
        axes[row, 1].set(xlabel="layer (1 = input side)", ylabel="|update| per step",
                         title=f"per-layer update norm, last epoch ({l.upper()})")
        axes[row, 0].legend(fontsize=8)
        axes[row, 1].legend(fontsize=8)
    save_figure(fig, "10-layer sigmoid MLP on DIGITS: SGD, EKFAC, Adam, DDPNOpt (Adam curvature, second order)",
                out / f"vanishing_{mode}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
