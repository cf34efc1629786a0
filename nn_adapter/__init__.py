"""nn_adapter: neural networks as occore control problems, and the DDPNOpt optimizer."""
# issue 5 (DDPNOpt, EKFAC, MMCLoss)
from .ddpnopt import DDPNOpt
from .ekfac import EKFAC
from .losses import MMCLoss
