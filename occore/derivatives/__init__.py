"""Derivative backends. Each is imported lazily: ``import occore`` loads neither casadi nor torch."""
from __future__ import annotations

from .base import Backend, DenseDerivatives

BACKENDS = ("casadi", "torch", "finite_difference")

__all__ = ["BACKENDS", "Backend", "DenseDerivatives", "make_backend"]


def make_backend(name: str, problem) -> Backend:
    """The backend called ``name`` for ``problem`` (its functions traced/compiled once here)."""
    if name == "casadi":
        from .casadi import CasadiBackend

        return CasadiBackend(problem)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(problem)
    if name == "finite_difference":
        from .finite_difference import FiniteDifferenceBackend

        return FiniteDifferenceBackend(problem)
    raise ValueError(f"backend={name!r} is unknown; valid backends are {', '.join(BACKENDS)}")
