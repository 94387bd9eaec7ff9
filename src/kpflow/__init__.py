"""kpflow: the operators of learning (K, P, P K P*) for recurrent networks, matrix-free."""

__version__ = "0.1.0"
