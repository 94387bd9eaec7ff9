"""Optimizers by name: every ``torch.optim`` optimizer, plus any registered with ``register_optimizer``.

A factory is called as ``factory(model, **options)`` and returns a ``torch.optim.Optimizer``. Two optional
hooks let an optimizer see more than gradients: if it has ``set_batch(batch)``, the trainer hands it each
training batch before the step; if ``requires_closure`` is true (L-BFGS, natural-gradient methods that
re-evaluate the loss), the trainer calls ``step(closure)`` with a closure that zeroes the gradients,
recomputes the loss and back-propagates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .natural_gradient import lowrank_ng

OptimizerFactory = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Register ``factory(model, **options) -> torch.optim.Optimizer`` under ``name`` (case-insensitive)."""
    if not callable(factory):
        raise TypeError(f"register_optimizer({name!r}, ...) needs a callable factory, got {factory!r}")
    OPTIMIZERS[str(name).lower()] = factory


def _torch_factory(cls):
    def factory(model, **options):
        return cls(model.parameters(), **options)

    factory.optimizer_class = cls
    factory.__doc__ = f"torch.optim.{cls.__name__} over all the model's parameters."
    return factory


for _name in dir(torch.optim):
    _cls = getattr(torch.optim, _name)
    if isinstance(_cls, type) and issubclass(_cls, torch.optim.Optimizer) and _cls is not torch.optim.Optimizer:
        register_optimizer(_name.lower(), _torch_factory(_cls))


def optimizer_names() -> list[str]:
    return sorted(OPTIMIZERS)


def optimizer_options(name: str) -> dict[str, object] | None:
    """The keyword options optimizer ``name`` accepts with their defaults (None when it takes any)."""
    factory = _lookup(name)
    target = getattr(factory, "optimizer_class", factory)
    sig = inspect.signature(target.__init__ if isinstance(target, type) else target)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()) and not isinstance(target, type):
        return None
    skip = {"self", "params", "model"}
    return {k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _lookup(name: str) -> OptimizerFactory:
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(optimizer_names())}")
    return OPTIMIZERS[key]


def make_optimizer(name: str, model: torch.nn.Module, **options) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; unknown names or options raise a ValueError listing valid ones."""
    factory = _lookup(name)
    allowed = optimizer_options(name)
    if allowed is not None:
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ValueError(f"optimizer {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                             f"valid options: {', '.join(allowed)}")
    opt = factory(model, **options)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer factory {name!r} returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


def needs_closure(opt: torch.optim.Optimizer) -> bool:
    return bool(getattr(opt, "requires_closure", False)) or isinstance(opt, torch.optim.LBFGS)

# kpflow's own optimizers (one-way import: natural_gradient does not know about this registry)
register_optimizer("lowrank-ng", lowrank_ng)
