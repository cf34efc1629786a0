"""Derivative backends. Each is imported lazily: ``import occore`` loads neither casadi nor torch."""
from __future__ import annotations

from ..errors import InputError
from .base import Backend, DenseDerivatives

BACKENDS = ("casadi", "torch", "finite_difference")

__all__ = ["BACKENDS", "Backend", "DenseDerivatives", "make_backend"]


def make_backend(name: str, problem, options=None) -> Backend:
    """The backend called ``name`` for ``problem`` (its functions traced/compiled once here).

    ``options``: the backend's keyword options (``{"compile": "auto" | "always" | "never"}`` for
    "torch"; none for the others); an unknown one is an InputError naming ``backend_options``."""
    from ..errors import InputError

    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InputError(f"backend_options: expected a dict, got {type(options).__name__}")
    valid = {"torch": ("compile",)}.get(name, ())
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"backend_options: {unknown} not understood by backend {name!r}; valid options "
                         f"are {list(valid) or 'none'}")
    if name == "casadi":
        from .casadi import CasadiBackend

        return CasadiBackend(problem)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(problem, **options)
    if name == "finite_difference":
        from .finite_difference import FiniteDifferenceBackend

        return FiniteDifferenceBackend(problem)
    raise InputError(f"backend={name!r} is unknown; valid backends are {', '.join(BACKENDS)}")
