"""Max-Mahalanobis center loss (Pang, Xu, Dong, Du, Chen & Zhu, ICLR 2020).

Classification as regression onto fixed class centres: the centres mu_1..mu_L in R^d are the
Max-Mahalanobis centres (unit vectors scaled by ``radius`` with every pairwise inner product equal
to -radius^2 / (L - 1), the most separated configuration), and the loss of a sample with
features z and label y is ||z - mu_y||^2 / 2. DDPNOpt's vanishing-gradient study uses it in place
of cross-entropy (its Hessian is dense: the identity).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MMCLoss", "mm_centers"]


def mm_centers(num_classes: int, dim: int, radius: float = 10.0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Max-Mahalanobis centres, (num_classes, dim), built by the recursion of Pang et al.

    Row 0 is e_1 and each next row has inner product -1/(L-1) with all earlier ones and unit
    norm; the result is scaled by ``radius``.

    Raises:
        ValueError: unless num_classes >= 2, dim >= num_classes - 1 and radius > 0.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"invalid num_classes: {num_classes!r} (expected an int >= 2)")
    if not isinstance(dim, int) or dim < num_classes - 1:
        raise ValueError(f"invalid dim: {dim!r} (expected an int >= num_classes - 1 = "
                         f"{num_classes - 1})")
    if not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"invalid radius: {radius!r} (expected a number > 0)")
    L = num_classes
    mu = torch.zeros(L, dim, dtype=torch.float64)
    mu[0, 0] = 1.0
    for i in range(1, L):
        for j in range(i):
            mu[i, j] = -(1.0 / (L - 1) + mu[i, :j] @ mu[j, :j]) / mu[j, j]
        if i < dim:
            mu[i, i] = math.sqrt(max(0.0, 1.0 - float(mu[i, :i] @ mu[i, :i])))
    return (radius * mu).to(dtype)


class MMCLoss(nn.Module):
    """Max-Mahalanobis center loss: mean over the batch of ||z_i - mu_{y_i}||^2 / 2.

    Args:
        num_classes: L >= 2.
        dim: feature size d >= L - 1 (the network's output width).
        radius: norm of every centre (Pang et al. use C_MM = 10).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Shapes:
        input (B, d) features; target (B,) class indices; output a scalar ((B,) for "none").

    ``predict(z)`` returns the class of the nearest centre.

    Example:
        >>> loss = MMCLoss(num_classes=3, dim=4)
        >>> z = loss.centers[[0, 2]].clone()
        >>> float(loss(z, torch.tensor([0, 2])))
        0.0
        >>> loss.predict(z).tolist()
        [0, 2]
    """

    def __init__(self, num_classes: int, dim: int, radius: float = 10.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"invalid reduction: {reduction!r} (expected 'mean', 'sum' or 'none')")
        self.reduction = reduction
        self.register_buffer("centers", mm_centers(num_classes, dim, radius,
                                                   torch.get_default_dtype()))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2 or input.shape[1] != self.centers.shape[1]:
            raise ValueError(f"input: expected shape (B, {self.centers.shape[1]}), "
                             f"got {tuple(input.shape)}")
        if target.shape != input.shape[:1]:
            raise ValueError(f"target: expected shape ({input.shape[0]},), got "
                             f"{tuple(target.shape)}")
        per_sample = 0.5 * (input - self.centers.to(input.dtype)[target]).square().sum(1)
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre for each row of ``input`` (B, d) -> (B,)."""
        return torch.cdist(input, self.centers.to(input.dtype)).argmin(1)
