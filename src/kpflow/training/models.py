"""Models by name for configs: ``build_model(name, input_dim, hidden, output_dim, g=, seed=, seq_len=)``.

Built-in names map to the cells in ``kpflow.models`` (``rnn``, ``leaky_rnn``, ``gru``, ``lstm``,
``neural_ode``: ``hidden`` is the state size) and to the weight-based site models:

* ``transformer``: ``kpflow.models.Transformer`` over tokens = time steps, ``hidden`` = ``d_model``;
  params ``n_heads`` (4), ``n_layers`` (2), ``d_ff`` (2·hidden), ``causal`` (True: step t sees steps ≤ t,
  as a recurrent network does), ``layer_norm`` (True), ``norm_first`` (False), ``activation``
  (``"gelu"``/``"relu"``), ``bias`` (True), ``pos_std`` (0.02). Its positional embedding has the task's
  ``seq_len`` rows.
* ``mlp``: ``kpflow.models.DeepMLP`` with depth as time, ``hidden`` = width; params ``depth`` (2),
  ``nonlinearity`` (``"relu"``/``"tanh"``/``"gelu"``/``"identity"``), ``bias`` (True), ``gain`` (1.0). It
  reads a task's whole trial ``[B, T, I]`` flattened and writes all T output steps at once, so it is
  built for the task's ``seq_len`` and refuses batches of another length.

``register_model(name, factory)`` adds a factory ``factory(input_dim, hidden, output_dim, **params)``
returning a ``RecurrentModel`` or a ``SiteModel`` whose ``forward(inputs [B, T, I])`` returns
``(states, outputs [B, T, O])``; a factory with a keyword ``seq_len`` is given the task's sequence length.
The initial recurrent weight scale ``g`` multiplies the recurrent (state-to-state) weight matrices after
initialisation; models without one (transformer, mlp) refuse ``g != 1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from kpflow.models.cells import AffineRecurrentModel

#: config name -> class name in kpflow.models
BUILTIN_MODELS = {"rnn": "VanillaRNN", "leaky_rnn": "LeakyRNN", "gru": "GRU", "lstm": "LSTM",
                  "neural_ode": "NeuralODE"}
MODELS: dict[str, Callable] = {}

#: parameter-name fragments that mark a recurrent (state-to-state) weight, checked in order
RECURRENT_MARKERS = ("weight_hh", "w_hh", "w_rec", "weight_rec", "recurrent", "w_h", "hh")


def _checked(model: str, params: dict, spec: dict) -> dict:
    """``params`` checked against ``spec = {name: (type or tuple of allowed values, default)}``, defaults filled.

    Raises:
        ValueError: a value of the wrong type or outside the allowed choices, naming what is valid.
    """
    out = {}
    for key, (kind, default) in spec.items():
        v = params.get(key, default)
        if isinstance(kind, tuple):
            if v not in kind:
                raise ValueError(f"model {model!r}: {key} = {v!r} is not valid; choose one of "
                                 f"{', '.join(map(repr, kind))}")
        elif kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"model {model!r}: {key} = {v!r} must be true or false")
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model {model!r}: {key} = {v!r} must be an integer >= 1")
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"model {model!r}: {key} = {v!r} must be a number >= 0")
            v = float(v)
        out[key] = v
    return out


def transformer_model(input_dim: int, hidden: int, output_dim: int, *, n_heads: int = 4, n_layers: int = 2,
                      d_ff: int | None = None, causal: bool = True, layer_norm: bool = True,
                      norm_first: bool = False, activation: str = "gelu", bias: bool = True,
                      pos_std: float = 0.02, seq_len: int | None = None):
    """The config model ``transformer``: ``Transformer(input_dim, d_model=hidden, ...)`` over tokens = time.

    Args:
        input_dim, hidden, output_dim: per-token input width, ``d_model``, per-token output width.
        n_heads, n_layers, d_ff, causal, layer_norm, norm_first, activation, bias, pos_std: as in
            ``kpflow.models.Transformer`` (``d_ff`` None: ``2·hidden``).
        seq_len: the task's sequence length (rows of the positional embedding; None: 512).

    Returns:
        The ``Transformer``.

    Raises:
        ValueError: a parameter of the wrong type, an unknown activation, ``hidden`` not divisible by
            ``n_heads``.
    """
    from kpflow.models import Transformer

    p = _checked("transformer", dict(n_heads=n_heads, n_layers=n_layers, d_ff=2 * hidden if d_ff is None else d_ff,
                                     causal=causal, layer_norm=layer_norm, norm_first=norm_first,
                                     activation=activation, bias=bias, pos_std=pos_std),
                 {"n_heads": (int, 4), "n_layers": (int, 2), "d_ff": (int, None), "causal": (bool, True),
                  "layer_norm": (bool, True), "norm_first": (bool, False), "activation": (("gelu", "relu"), "gelu"),
                  "bias": (bool, True), "pos_std": (float, 0.02)})
    if hidden % p["n_heads"]:
        raise ValueError(f"model 'transformer': hidden (= d_model) = {hidden} must be divisible by n_heads = "
                         f"{p['n_heads']}")
    return Transformer(input_dim, hidden, output_dim=output_dim, max_len=512 if seq_len is None else seq_len,
                       **p)


def mlp_model(input_dim: int, hidden: int, output_dim: int, *, depth: int = 2, nonlinearity: str = "relu",
              bias: bool = True, gain: float = 1.0, seq_len: int | None = None):
    """The config model ``mlp``: ``DeepMLP(input_dim, width=hidden, depth, output_dim, ..., seq_len)``.

    Args:
        input_dim, hidden, output_dim: per-step input width, the width, per-step output width.
        depth, nonlinearity, bias, gain: as in ``kpflow.models.DeepMLP``.
        seq_len: the task's sequence length (the MLP reads a whole trial flattened); None: ``[B, I]`` inputs.

    Returns:
        The ``DeepMLP``.

    Raises:
        ValueError: a parameter of the wrong type or an unknown nonlinearity.
    """
    from kpflow.models import DeepMLP

    p = _checked("mlp", dict(depth=depth, nonlinearity=nonlinearity, bias=bias, gain=gain),
                 {"depth": (int, 2), "nonlinearity": (("relu", "tanh", "gelu", "identity"), "relu"),
                  "bias": (bool, True), "gain": (float, 1.0)})
    return DeepMLP(input_dim, hidden, p.pop("depth"), output_dim, seq_len=seq_len, **p)


#: config name -> factory of the weight-based site models
SITE_MODELS: dict[str, Callable] = {"transformer": transformer_model, "mlp": mlp_model}


def register_model(name: str, factory: Callable) -> None:
    """Register ``factory(input_dim, hidden, output_dim, **params) -> RecurrentModel`` under ``name``."""
    if not callable(factory):
        raise TypeError(f"register_model({name!r}, ...) needs a callable factory, got {factory!r}")
    MODELS[str(name).lower()] = factory


def model_names() -> list[str]:
    """The valid config model names (built-in and registered), sorted.

    Returns:
        The names.
    """
    return sorted({*BUILTIN_MODELS, *SITE_MODELS, *MODELS})


def _lookup(name: str) -> Callable:
    key = str(name).lower()
    if key in MODELS:
        return MODELS[key]
    if key in SITE_MODELS:
        return SITE_MODELS[key]
    if key in BUILTIN_MODELS:
        import kpflow.models as km

        cls = getattr(km, BUILTIN_MODELS[key], None)
        if cls is None:
            raise ValueError(f"model {name!r} ({BUILTIN_MODELS[key]}) is not available in kpflow.models yet")
        return cls
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")


def unknown_parameters_message(name: str, unknown: list[str], allowed) -> str:
    """The error message for parameters ``unknown`` that model ``name`` does not take.

    Returns:
        The message, naming the valid parameters (and where ``seq_len`` / ``d_model`` / ``width`` come from).
    """
    hints = {"seq_len": "seq_len is the task's (task.params.seq_len)", "d_model": "d_model is model.hidden",
             "width": "the width is model.hidden"}
    hint = "; ".join(hints[k] for k in unknown if k in hints)
    return (f"model {name!r} has no parameter(s) {', '.join(map(repr, unknown))}{f' ({hint})' if hint else ''}; "
            f"valid parameters: {', '.join(allowed) or '(none)'}")


def model_parameters(name: str) -> dict[str, object] | None:
    """Extra constructor parameters model ``name`` accepts (beyond the three sizes), or None for any."""
    factory = _lookup(name)
    sig = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    sizes = {"self", "input_dim", "state_dim", "hidden", "hidden_dim", "output_dim", "dtype", "device", "seq_len"}
    return {k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items() if k not in sizes and p.kind is not p.VAR_POSITIONAL}


def recurrent_weight_names(model: torch.nn.Module) -> list[str]:
    """Names of the recurrent weight matrices: ``model.recurrent_weight_names`` when the model declares
    them, else the weights whose site variable is one of the ``state_sites`` (``affine_terms`` of an
    ``AffineRecurrentModel``), else 2-D cell parameters named ``W`` or containing a recurrent marker
    (``weight_hh``, ``W_rec``)."""
    declared = getattr(model, "recurrent_weight_names", None)
    if declared:
        return list(declared() if callable(declared) else declared)
    if isinstance(model, AffineRecurrentModel):  # the declared protocol: weights whose site is a state site
        hits = [f"cell.{n}" for n, (_slot, site) in model.affine_terms.items() if site in model.state_sites]
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
    from kpflow.models.sites import SiteModel

    names = recurrent_weight_names(model)
    if not names and g != 1.0 and isinstance(model, SiteModel):
        raise ValueError(f"cannot apply the recurrent weight scale g={g}: {type(model).__name__} has no recurrent "
                         "(state-to-state) weight, so model.g must be 1 (leave it unset for transformer and mlp)")
    if not names and g != 1.0:
        raise ValueError(f"cannot apply the recurrent weight scale g={g}: no recurrent weight found among "
                         f"{[n for n, _ in model.named_parameters()]}; declare `recurrent_weight_names` on the model")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].mul_(float(g))
    return names


def build_model(name: str, input_dim: int, hidden: int, output_dim: int, *, g: float = 1.0, seed: int = 0,
                device=None, dtype=torch.float32, seq_len: int | None = None, **params) -> torch.nn.Module:
    """Build model ``name`` with weights drawn from ``seed`` (the global RNG is left untouched) and the
    recurrent weights scaled by ``g``.

    Args:
        name: a config model name (``model_names()``).
        input_dim, hidden, output_dim: the task's input width, the model's size, the task's output width.
        g: recurrent weight scale (models without a recurrent weight need 1).
        seed: seed of the initial weights.
        device, dtype: of the parameters.
        seq_len: the task's sequence length, passed to factories that take a ``seq_len`` keyword.
        **params: the model's own parameters (``model_parameters(name)``).

    Returns:
        The model.

    Raises:
        ValueError: an unknown model or parameter (naming the valid ones), an invalid value, ``g != 1`` for a
            model without a recurrent weight.
    """
    factory = _lookup(name)
    allowed = model_parameters(name)
    if allowed is not None:
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise ValueError(unknown_parameters_message(name, unknown, allowed))
    if seq_len is not None and "seq_len" in inspect.signature(
            factory.__init__ if isinstance(factory, type) else factory).parameters:
        params = {**params, "seq_len": int(seq_len)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = factory(int(input_dim), int(hidden), int(output_dim), **params)
    if g != 1.0:
        scale_recurrent_weight(model, g)
    return model.to(device=device, dtype=dtype)
