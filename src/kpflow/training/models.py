"""Models by name for configs: ``build_model(name, input_dim, hidden, output_dim, g=, seed=)``.

Built-in names map to the cells in ``kpflow.models``; ``register_model(name, factory)`` adds a factory
``factory(input_dim, hidden, output_dim, **params) -> RecurrentModel``. The initial recurrent weight
scale ``g`` multiplies the recurrent (state-to-state) weight matrices after initialisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

#: config name -> class name in kpflow.models
BUILTIN_MODELS = {"rnn": "VanillaRNN", "leaky_rnn": "LeakyRNN", "gru": "GRU", "lstm": "LSTM",
                  "neural_ode": "NeuralODE"}
MODELS: dict[str, Callable] = {}

#: parameter-name fragments that mark a recurrent (state-to-state) weight, checked in order
RECURRENT_MARKERS = ("weight_hh", "w_hh", "w_rec", "weight_rec", "recurrent", "w_h", "hh")


def register_model(name: str, factory: Callable) -> None:
    """Register ``factory(input_dim, hidden, output_dim, **params) -> RecurrentModel`` under ``name``."""
    if not callable(factory):
        raise TypeError(f"register_model({name!r}, ...) needs a callable factory, got {factory!r}")
    MODELS[str(name).lower()] = factory


def model_names() -> list[str]:
    return sorted({*BUILTIN_MODELS, *MODELS})


def _lookup(name: str) -> Callable:
    key = str(name).lower()
    if key in MODELS:
        return MODELS[key]
    if key in BUILTIN_MODELS:
        import kpflow.models as km

        cls = getattr(km, BUILTIN_MODELS[key], None)
        if cls is None:
            raise ValueError(f"model {name!r} ({BUILTIN_MODELS[key]}) is not available in kpflow.models yet")
        return cls
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")


def model_parameters(name: str) -> dict[str, object] | None:
    """Extra constructor parameters model ``name`` accepts (beyond the three sizes), or None for any."""
    factory = _lookup(name)
    sig = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    sizes = {"self", "input_dim", "state_dim", "hidden", "hidden_dim", "output_dim", "dtype", "device"}
    return {k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items() if k not in sizes and p.kind is not p.VAR_POSITIONAL}


def recurrent_weight_names(model: torch.nn.Module) -> list[str]:
    """Names of the recurrent weight matrices: ``model.recurrent_weight_names`` when the model declares
    them, else the weights whose site variable is the previous state (``affine_terms`` of the built-in
    cells), else 2-D cell parameters named ``W`` or containing a recurrent marker (``weight_hh``, ``W_rec``)."""
    declared = getattr(model, "recurrent_weight_names", None)
    if declared:
        return list(declared() if callable(declared) else declared)
    terms = getattr(model, "affine_terms", None)
    if isinstance(terms, dict):
        state_sites = {"z", "h", "phi_z"}
        hits = [f"cell.{n}" for n, (_slot, site) in terms.items() if site in state_sites]
        if hits:
            return hits
    names = [n for n, p in model.named_parameters() if n.startswith("cell.") and p.dim() == 2]
    for exact in ("cell.W", "cell.W1"):  # vanilla / leaky RNN; neural ODE (the weight reading the state)
        if exact in names:
            return [exact]
    for marker in RECURRENT_MARKERS:
        hits = [n for n in names if marker in n.lower()]
        if hits:
            return hits
    return []


def scale_recurrent_weight(model: torch.nn.Module, g: float) -> list[str]:
    """Multiply the recurrent weights by ``g`` in place; returns the names scaled."""
    names = recurrent_weight_names(model)
    if not names and g != 1.0:
        raise ValueError(f"cannot apply the recurrent weight scale g={g}: no recurrent weight found among "
                         f"{[n for n, _ in model.named_parameters()]}; declare `recurrent_weight_names` on the model")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].mul_(float(g))
    return names


def build_model(name: str, input_dim: int, hidden: int, output_dim: int, *, g: float = 1.0, seed: int = 0,
                device=None, dtype=torch.float32, **params) -> torch.nn.Module:
    """Build model ``name`` with weights drawn from ``seed`` (the global RNG is left untouched) and the
    recurrent weights scaled by ``g``."""
    factory = _lookup(name)
    allowed = model_parameters(name)
    if allowed is not None:
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise ValueError(f"model {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                             f"valid parameters: {', '.join(allowed) or '(none)'}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = factory(int(input_dim), int(hidden), int(output_dim), **params)
    if g != 1.0:
        scale_recurrent_weight(model, g)
    return model.to(device=device, dtype=dtype)
