"""Models: recurrent cells as pure functions ``step(params, z_prev, x_t)`` plus a linear readout.

Also weight-based site models (``kpflow.models.sites``: deep MLP, transformer, any ``nn.Module`` of
``nn.Linear`` layers) whose forward pass names its weight sites — the general joint-state formulation.
"""

from .adapter import CellAdapter, ModuleAdapter
from .base import Params, RecurrentModel
from .cells import GRU, LSTM, AffineRecurrentModel, LeakyRNN, ParameterCell, VanillaRNN, activation
from .mlp import DeepMLP
from .neural_ode import NeuralODE
from .sites import JointLayout, RecurrentSites, SiteModel, Sites, as_site_model
from .transformer import TorchTransformer, Transformer

__all__ = [
    "RecurrentModel", "Params", "AffineRecurrentModel", "ParameterCell", "activation",
    "VanillaRNN", "LeakyRNN", "GRU", "LSTM", "NeuralODE", "CellAdapter",
    "SiteModel", "Sites", "JointLayout", "RecurrentSites", "as_site_model", "DeepMLP", "Transformer",
    "TorchTransformer", "ModuleAdapter",
]
