"""occore: one trajectory-optimisation core (DDP, iLQR, E-MSA) for control problems and networks.

``import occore`` loads numpy and scipy only; casadi and torch are imported by the backends that
need them.
"""
from __future__ import annotations

import logging

from . import problems, reference
from .callbacks import Logger, Verbose
from .comparison import compare
from .derivatives.check import DerivativeReport, check_derivatives
from .errors import DerivativeError, InputError, OccoreError, ShapeError, TraceError
from .mpc import MPC, ClosedLoop, simulate
from .problem import Problem
from .result import IterationInfo, Result, Status
from .solvers.cddp import CDDP, Multipliers
from .solvers.ddp import DDP, ILQR
from .solvers.fddp import FDDP
from .solvers.emsa import EMSA, EMSAOptions, InnerSolver
from .solvers.options import CDDPOptions, DDPOptions, FDDPOptions, LineSearch, Regularization
from .types import ControlProblem, LocalModel, Policy, Trajectory

logging.getLogger("occore").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "DDP", "ILQR", "EMSA", "CDDP", "FDDP", "MPC", "simulate", "ClosedLoop", "Problem", "Multipliers", "CDDPOptions", "FDDPOptions", "Result", "Status", "IterationInfo", "Trajectory", "Policy",
    "ControlProblem", "LocalModel", "DDPOptions", "EMSAOptions", "InnerSolver", "LineSearch",
    "Regularization", "Logger", "Verbose", "OccoreError", "ShapeError", "InputError", "DerivativeError", "TraceError",
    "problems", "reference", "compare", "check_derivatives", "DerivativeReport",
]
