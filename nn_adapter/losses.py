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

from occore.errors import InputError, ShapeError
from occore.validation import is_integer, is_real

from .errors import DataError, DtypeError

__all__ = ["MMCLoss", "mm_centers"]


def mm_centers(num_classes: int, dim: int, radius: float = 10.0,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The Max-Mahalanobis centres, (num_classes, dim), built by the recursion of Pang et al.

    Row 0 is e_1 and each next row has inner product -1/(L-1) with all earlier ones and unit
    norm; the result is scaled by ``radius``.

    Raises:
        InputError: (a ``ValueError``) unless num_classes >= 2 and dim >= num_classes - 1 are
            ints and radius is a finite number > 0 (bools are refused).
    """
    if not is_integer(num_classes) or num_classes < 2:
        raise InputError(f"invalid num_classes: {num_classes!r} (expected an int >= 2)")
    if not is_integer(dim) or dim < num_classes - 1:
        raise InputError(f"invalid dim: {dim!r} (expected an int >= num_classes - 1 = "
                         f"{num_classes - 1})")
    if not (is_real(radius) and math.isfinite(radius) and radius > 0):
        raise InputError(f"invalid radius: {radius!r} (expected a finite number > 0)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"invalid dtype: {dtype!r} (expected a floating-point torch.dtype)")
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

    Raises:
        InputError: (at construction) an invalid ``num_classes``, ``dim``, ``radius`` or
            ``reduction``.
        TypeError / ShapeError / DtypeError / DataError: (at the call) an input or target that
            is not a tensor, of the wrong shape, a target that is not integer class indices, or
            a class index outside [0, num_classes).

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
            raise InputError(f"invalid reduction: {reduction!r} (expected 'mean', 'sum' or 'none')")
        self.reduction = reduction
        self.register_buffer("centers", mm_centers(num_classes, dim, radius,
                                                   torch.get_default_dtype()))

    def _check_input(self, input) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 2 or input.shape[1] != self.centers.shape[1]:
            raise ShapeError("input", f"(B, {self.centers.shape[1]})", tuple(input.shape))
        if not input.is_floating_point():
            raise DtypeError("input", "a floating-point dtype", input.dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
        if target.shape != input.shape[:1]:
            raise ShapeError("target", f"({input.shape[0]},)", tuple(target.shape))
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise DtypeError("target", "integer class indices", target.dtype)
        if target.numel() and not bool(((target >= 0) & (target < len(self.centers))).all()):
            raise DataError("target", f"class indices must lie in [0, {len(self.centers)}), got "
                            f"{int(target.min())}..{int(target.max())}")
        # long: a uint8 index tensor would be taken for a boolean mask (wrong rows, no error)
        per_sample = 0.5 * (input - self.centers.to(input.dtype)[target.long()]).square().sum(1)
        if self.reduction == "mean":
            return per_sample.mean()
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre for each row of ``input`` (B, d) -> (B,) (the checks of
        the loss's input: TypeError, ShapeError, DtypeError)."""
        self._check_input(input)
        return torch.cdist(input, self.centers.to(input.dtype)).argmin(1)
