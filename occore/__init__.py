"""occore: one trajectory-optimisation core (DDP, iLQR, E-MSA) for control problems and networks.

``import occore`` loads numpy and scipy only; casadi and torch are imported by the backends that
need them.
"""
from __future__ import annotations

import logging

from . import problems
from .callbacks import Logger, Verbose
from .errors import DerivativeError, InputError, OccoreError, ShapeError
from .problem import Problem
from .result import IterationInfo, Result, Status
from .solvers.ddp import DDP, ILQR
from .solvers.options import DDPOptions, LineSearch, Regularization
from .types import ControlProblem, LocalModel, Policy, Trajectory

logging.getLogger("occore").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "DDP", "ILQR", "Problem", "Result", "Status", "IterationInfo", "Trajectory", "Policy",
    "ControlProblem", "LocalModel", "DDPOptions", "LineSearch", "Regularization", "Logger", "Verbose",
    "OccoreError", "ShapeError", "InputError", "DerivativeError", "problems",
]

from . import reference  # noqa: E402  (E-MSA, the IPOPT reference and the comparison: issue 6)
from .solvers.emsa import EMSA, EMSAOptions, InnerSolver  # noqa: E402
from .comparison import compare  # noqa: E402  (a function; the package is occore.comparison)

__all__ += ["EMSA", "EMSAOptions", "InnerSolver", "reference", "compare"]
from .derivatives.check import check_derivatives, DerivativeReport  # noqa: E402
__all__ += ["check_derivatives", "DerivativeReport"]
