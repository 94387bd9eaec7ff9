"""Recurrent models as pure functions ``step(params, z_prev, x_t)`` plus a linear readout."""

from .adapter import CellAdapter
from .base import Params, RecurrentModel
from .cells import GRU, LSTM, AffineRecurrentModel, LeakyRNN, ParameterCell, VanillaRNN, activation
from .neural_ode import NeuralODE

__all__ = [
    "RecurrentModel", "Params", "AffineRecurrentModel", "ParameterCell", "activation",
    "VanillaRNN", "LeakyRNN", "GRU", "LSTM", "NeuralODE", "CellAdapter",
]
