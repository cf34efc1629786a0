"""nn_adapter: a torch network as a control problem for occore's solvers, and the DDPNOpt optimizer."""
from .errors import MemoryLimitError, UnsupportedModuleError
from .stages import Stage, Stages, split_stages
