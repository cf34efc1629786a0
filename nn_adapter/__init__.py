"""nn_adapter: neural networks as occore control problems, and the DDPNOpt optimizer."""
import logging

# library code logs to "nn_adapter" and never prints; the application decides where logs go
logging.getLogger("nn_adapter").addHandler(logging.NullHandler())

# issue 4 (stages, NetworkProblem, network local model, E-MSA hooks)
from .errors import (DataDependentForwardError, DataError, DtypeError, MemoryLimitError,
                     UnsupportedModuleError)
from .local_model import NetworkLocalModel
from .problem import NetworkProblem
from .stages import Stage, Stages, split_stages

# issue 5 (DDPNOpt, EKFAC, MMCLoss)
from .ddpnopt import DDPNOpt
from .ekfac import EKFAC
from .losses import MMCLoss
