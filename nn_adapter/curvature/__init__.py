"""Curvatures E[Q_uu] shared by DDPNOpt and its base optimizers (one file per curvature).

==========  ==========================================  =====================
name        P = E[Q_uu]^-1 (learning rate included)     base optimizer
==========  ==========================================  =====================
identity    lr I (momentum, nesterov in the step)       torch.optim.SGD
rmsprop     lr / (sqrt(v) + eps)                        torch.optim.RMSprop
adam        lr / (sqrt(v / (1 - beta2^t)) + eps)         torch.optim.Adam
ekfac       lr Q_G diag(1 / (s + damping)) Q_A^T        nn_adapter.EKFAC
==========  ==========================================  =====================
"""
from __future__ import annotations

from occore.errors import InputError

from .adam import AdamCurvature
from .base import Block, Curvature, apply_factors, as_matrix, find_blocks, from_matrix
from .ekfac import EKFACCurvature
from .identity import IdentityCurvature
from .rmsprop import RMSpropCurvature

__all__ = ["Block", "Curvature", "IdentityCurvature", "RMSpropCurvature", "AdamCurvature",
           "EKFACCurvature", "CURVATURES", "make_curvature", "find_blocks", "as_matrix",
           "from_matrix", "apply_factors"]

CURVATURES = {c.name: c for c in (IdentityCurvature, RMSpropCurvature, AdamCurvature,
                                  EKFACCurvature)}


def make_curvature(name: str) -> Curvature:
    """The curvature called ``name`` (one of ``CURVATURES``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example:
        >>> make_curvature("rmsprop").name
        'rmsprop'
    """
    if not isinstance(name, str) or name not in CURVATURES:
        raise InputError(f"invalid curvature: {name!r} (expected one of {sorted(CURVATURES)})")
    return CURVATURES[name]()
