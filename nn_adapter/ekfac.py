"""EKFAC (George et al., NeurIPS 2018) as a torch optimizer: the baseline and DDPNOpt's ``ekfac``."""
from __future__ import annotations

from torch import nn

from .curvature.optimizer import CurvatureOptimizer

__all__ = ["EKFAC"]


class EKFAC(CurvatureOptimizer):
    """Eigenvalue-corrected K-FAC; see :mod:`nn_adapter.curvature.ekfac` for the exact definition.

    Linear and Conv2d layers get the Kronecker-factored eigenbasis with corrected diagonal; other
    parameters a diagonal curvature. ``step`` needs a closure (the hooks that record the layer
    inputs and output gradients are active only while it runs). The closure's loss must be the
    batch mean of per-sample losses.

    Args:
        model: the network.
        lr: learning rate.
        damping: added to the corrected eigenvalues.
        stat_decay: running-average decay of the factors and of the corrected eigenvalues.
        factor_update_freq: steps between updates of the Kronecker factors.
        eigen_update_freq: steps between eigendecompositions of the factors.
        weight_decay: L2 penalty added to the gradient.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        >>> opt = EKFAC(net, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = nn.functional.cross_entropy(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> sorted(opt.state[net[0].weight])
        ['A', 'G', 'QA', 'QG', 'scale', 'step']
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3,
                 stat_decay: float = 0.95, factor_update_freq: int = 1,
                 eigen_update_freq: int = 100, weight_decay: float = 0.0):
        super().__init__(model, "ekfac", lr, damping=damping, stat_decay=stat_decay,
                         factor_update_freq=factor_update_freq,
                         eigen_update_freq=eigen_update_freq, weight_decay=weight_decay)
