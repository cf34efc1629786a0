"""EKFAC (George et al., NeurIPS 2018) as a torch optimizer: the baseline and DDPNOpt's ``ekfac``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .curvature.optimizer import CurvatureOptimizer

__all__ = ["EKFAC"]


class EKFAC(CurvatureOptimizer):
    """Eigenvalue-corrected K-FAC; see :mod:`nn_adapter.curvature.ekfac` for the exact definition.

    Linear and Conv2d layers of ``model`` get the Kronecker-factored eigenbasis with corrected
    diagonal; other parameters a diagonal curvature. The loss must be the batch mean of
    per-sample losses. ``step(closure)`` records the layer inputs and output gradients while the
    closure runs; ``step()`` without a closure uses those of the user's own forward and backward
    pass since the last step (each layer must run once in it; evaluate under
    ``torch.no_grad()``). Param groups, ``add_param_group``, ``state_dict`` and LR schedulers
    work as in ``torch.optim``; a layer's weight and bias must be in the same group.

    Args:
        params: the parameters (tensors or param-group dicts), or the model itself.
        lr: learning rate.
        damping: added to the corrected eigenvalues.
        stat_decay: running-average decay of the factors and of the corrected eigenvalues.
        factor_update_freq: steps between updates of the Kronecker factors.
        eigen_update_freq: steps between eigendecompositions of the factors.
        weight_decay: L2 penalty added to the gradient (or, decoupled, to the parameters).
        decoupled_weight_decay: True: ``p <- p (1 - lr weight_decay)`` before the step instead
            (as ``torch.optim.AdamW``).
        model: the network whose layers are preconditioned (required unless ``params`` is it);
            a ``DistributedDataParallel`` makes the step data-parallel: the Kronecker factors
            and eigenvalue corrections are averaged over the ranks (one collective per step, two
            on eigenbasis refreshes, and one agreement; :mod:`nn_adapter.distributed`).
        process_group: data-parallel over this group with a plain model (the optimizer then
            averages the gradients too).

    Raises:
        TypeError: no model.
        ValueError: an invalid hyperparameter (named), or a layer split over two groups.

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
        >>> opt = EKFAC([{"params": net[0].parameters(), "lr": 0.01},
        ...              {"params": net[2].parameters()}], lr=0.1, model=net)
        >>> opt.zero_grad()
        >>> nn.functional.cross_entropy(net(x), y).backward()
        >>> opt.step()                      # the records of that forward and backward pass
        >>> opt.state[net[2].weight]["step"]
        1
    """

    def __init__(self, params, lr: float = 0.01, damping: float = 1e-3,
                 stat_decay: float = 0.95, factor_update_freq: int = 1,
                 eigen_update_freq: int = 100, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, *, model: Optional[nn.Module] = None,
                 process_group=None):
        super().__init__(params, "ekfac", lr, model=model, process_group=process_group,
                         damping=damping, stat_decay=stat_decay,
                         factor_update_freq=factor_update_freq,
                         eigen_update_freq=eigen_update_freq, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay)
