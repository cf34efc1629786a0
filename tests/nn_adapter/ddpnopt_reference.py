"""Reference parameters of DDPNOpt on nn.Sequential models, recorded before the redesign that put
DDPNOpt through occore's solver step (issue 10). ``python tests/nn_adapter/ddpnopt_reference.py``
rewrites ``data/ddpnopt_reference.pt``; the test compares the current implementation with it.

Two cases were re-recorded after the redesign, because their definition changed on purpose:
``mlp-adam-second_order`` and ``mlp-identity-eps``. With stages found by hooks (any module graph),
a stage is the parametrised module alone, so the second-order term is the module's own
V_x . h_ux dx and the Tikhonov term eps h_u^T h_x dx, no longer taken through the activation that
follows the module (which only a chain of stages defines). Before the change they differed from
the new values by 3.6e-3 and 1.9e-5 (parameters after 5 steps). ``eps_vxx`` then became the
solver's mu in the state form, added at every stage's output including the last (it used to skip
the last stage): ``mlp-identity-eps`` moved by a further 1.2e-4.
"""
from __future__ import annotations

import pathlib

import torch
from torch import nn

FILE = pathlib.Path(__file__).parent / "data" / "ddpnopt_reference.pt"
STEPS, B = 5, 8

CURVATURES = {"identity": dict(lr=0.05, momentum=0.9), "rmsprop": dict(lr=0.01),
              "adam": dict(lr=0.02), "ekfac": dict(lr=0.05)}

# (name, model, curvature, options)
CASES = ([(f"{m}-{c}", m, c, {}) for m in ("mlp", "cnn") for c in CURVATURES]
         + [("mlp-adam-gauss_newton", "mlp", "adam", dict(terminal_hessian="gauss_newton")),
            ("mlp-ekfac-gauss_newton", "mlp", "ekfac", dict(terminal_hessian="gauss_newton")),
            ("cnn-adam-gauss_newton", "cnn", "adam", dict(terminal_hessian="gauss_newton")),
            ("mlp-adam-gradient", "mlp", "adam", dict(terminal_hessian="gradient")),
            ("mlp-adam-sampled", "mlp", "adam", dict(terminal_hessian="sampled")),
            ("mlp-adam-dense", "mlp", "adam", dict(feedback="dense")),
            ("mlp-ekfac-dense-gn", "mlp", "ekfac", dict(feedback="dense", terminal_hessian="gauss_newton")),
            ("mlp-adam-unbounded", "mlp", "adam", dict(feedback_bound=float("inf"))),
            ("mlp-adam-second_order", "mlp", "adam", dict(second_order=True)),
            ("mlp-identity-eps", "mlp", "identity", dict(eps_vxx=0.1)),
            ("mlp-adam-no_vxx", "mlp", "adam", dict(vxx_update=False)),
            ("cnn-ekfac-unbounded", "cnn", "ekfac", dict(feedback_bound=float("inf"))),
            ("mlp-adam-mse", "mlp", "adam", dict(loss="mse"))])


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    else:
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    return net.double()


def batches(kind: str, loss: str = "auto"):
    g = torch.Generator().manual_seed(1)
    shape = (1, 5, 5) if kind == "cnn" else (4,)
    for _ in range(STEPS):
        x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
        y = (torch.randn(B, 3, generator=g, dtype=torch.float64) if loss == "mse"
             else torch.randint(0, 3, (B,), generator=g))
        yield x, y


def run(case) -> list[torch.Tensor]:
    """Parameters after each of the STEPS steps (flattened, concatenated)."""
    from nn_adapter import DDPNOpt

    _, kind, curvature, options = case
    net = make_model(kind)
    opt = DDPNOpt(net, curvature=curvature, **CURVATURES[curvature], **options)
    loss_fn = nn.MSELoss() if options.get("loss") == "mse" else nn.CrossEntropyLoss()
    out = []
    for x, y in batches(kind, options.get("loss", "auto")):
        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        out.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone())
    return out


if __name__ == "__main__":
    FILE.parent.mkdir(exist_ok=True)
    torch.save({case[0]: torch.stack(run(case)) for case in CASES}, FILE)
    print(f"wrote {FILE}")
