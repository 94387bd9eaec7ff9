"""Jacobian operators of an unrolled recurrent model for one optimizer step.

``J = dz/dθ`` (states with respect to the flat vector of the trained cell parameters) is the same operator
as ``P Jθ`` of :mod:`kpflow.kernels.state_space`, evaluated the way a training step evaluates its gradient:

* :class:`UnrolledJacobian` — reverse mode on the recording's retained autograd graph: ``J* y`` is one
  backward pass, ``J v = ∂/∂u ⟨J* u, v⟩`` one double-backward pass.
* :class:`AutotunedJacobian` — ``J*`` on that graph and ``J v`` from whichever of the double-backward pass
  and the forward-mode ``P Jθ`` of :mod:`kpflow.kernels` is faster here.
* :func:`record_for_step` — a :class:`~kpflow.kernels.Trajectory` and its :class:`UnrolledJacobian` from
  one forward and one backward pass (``e = ∂L/∂z`` and the gradient ``J* e`` together, as in SGD).
* :class:`CountingOperator` — counts the products with ``J`` and ``J*`` (the cost of a step).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kpflow.operators import LinearOperator

from .state_space import param_jacobian, propagator
from .trajectory import Trajectory, loss_value

__all__ = ["CountingOperator", "UnrolledJacobian", "AutotunedJacobian", "kernel_jacobian", "record_for_step",
           "output_error"]


class CountingOperator(LinearOperator):
    """Wraps ``J`` and counts its products: ``jvps`` probes through ``J``, ``vjps`` through ``J*``."""

    def __init__(self, base: LinearOperator):
        super().__init__(base.shape_in, base.shape_out, base.dtype, base.device,
                         is_self_adjoint=base.is_self_adjoint, is_psd=base.is_psd)
        self.base = base
        self.jvps = 0
        self.vjps = 0

    def _matmat(self, X):
        self.jvps += X.shape[0]
        return self.base._matmat(X)

    def _rmatmat(self, Y):
        self.vjps += Y.shape[0]
        return self.base._rmatmat(Y)



def kernel_jacobian(traj, param_names: Sequence[str]):
    """``J = P Jθ`` from :mod:`kpflow.kernels`, and ``Jθ`` alone (to reuse the recorded ``P* e``).

    Args:
        traj: a recorded trajectory.
        param_names: the cell parameters θ that ``J`` differentiates with respect to.

    Returns:
        ``(P @ Jθ, Jθ)`` as ``LinearOperator``s (parameters → states).
    """
    Jtheta = param_jacobian(traj, list(param_names))
    return propagator(traj) @ Jtheta, Jtheta


class UnrolledJacobian(LinearOperator):
    """``J = dz/dθ`` by reverse-mode autodiff through the unrolled recurrence, on one retained graph.

    The same operator as ``P Jθ`` of :mod:`kpflow.kernels`, evaluated the way a training step
    evaluates its gradient: one forward pass builds the autograd graph; every ``J* y`` is then one
    backward pass over it, and every ``J v`` one double-backward pass (``J v = ∂/∂u ⟨J* u, v⟩``, the
    graph of ``u ↦ J* u`` being built once on first use). Several probes go through one vmapped
    backward pass of the graph (``is_grads_batched``: the Python-level cost of a pass is paid once,
    so k probes cost far less than k passes); models whose ops lack a batching rule fall back to a
    loop over the probes. Flat parameter vectors follow ``names`` (the model's parameter order).
    """

    def __init__(self, model, params: dict, names: Sequence[str], inputs: torch.Tensor, z0: torch.Tensor):
        fixed = {k: v.detach() for k, v in params.items()}
        self.names = tuple(names)
        self._leaves = [fixed[n].clone().requires_grad_(True) for n in self.names]
        self._shapes = [tuple(t.shape) for t in self._leaves]
        self._sizes = [t.numel() for t in self._leaves]
        with torch.enable_grad():
            self._out = model.unroll({**fixed, **dict(zip(self.names, self._leaves, strict=True))}, inputs, z0)
        self.states = self._out.detach()
        self.gradient = None  # J* e, when the recording computed it with e
        self._dual = None  # (u, J* u) with the graph of the backward pass, for JVPs
        self._batched = None  # whether vmapped (is_grads_batched) backward passes work for this model
        super().__init__((sum(self._sizes),), tuple(self.states.shape), self.states.dtype, self.states.device)

    def _vjp(self, y, create_graph=False):
        grads = torch.autograd.grad(self._out, self._leaves, y, retain_graph=True, create_graph=create_graph,
                                    allow_unused=True)
        return torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                          for g, leaf in zip(grads, self._leaves, strict=True)])

    def _vjp_batched(self, Y):
        """``J* Y`` for all probes in one vmapped backward pass (``is_grads_batched``); None if unsupported."""
        if self._batched is False or Y.shape[0] == 1:
            return None
        try:
            grads = torch.autograd.grad(self._out, self._leaves, Y, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: loop over the probes instead
            self._batched = False
            return None
        self._batched = True
        return torch.cat([(Y.new_zeros(Y.shape[0], leaf.numel()) if g is None else g.reshape(Y.shape[0], -1))
                          for g, leaf in zip(grads, self._leaves, strict=True)], 1)

    def _rmatmat(self, Y):
        with torch.enable_grad():
            out = self._vjp_batched(Y)
            return (out if out is not None else torch.stack([self._vjp(y) for y in Y])).detach()

    def _matmat(self, V):
        with torch.enable_grad():
            if self._dual is None:
                u = torch.zeros_like(self.states, requires_grad=True)
                self._dual = (u, self._vjp(u, create_graph=True))
            u, g = self._dual
            if not g.requires_grad:  # J* does not depend on u through a graph: J is zero
                return torch.zeros(V.shape[0], *self.shape_out, dtype=self.dtype, device=self.device)
            if self._batched is not False and V.shape[0] > 1:
                try:
                    return torch.autograd.grad(g, u, V, retain_graph=True, is_grads_batched=True)[0].detach()
                except RuntimeError:
                    self._batched = False
            return torch.stack([torch.autograd.grad(g, u, v, retain_graph=True)[0] for v in V]).detach()


class AutotunedJacobian(LinearOperator):
    """``J`` with ``J*`` on the recording's autograd graph and ``J v`` from the faster of two paths.

    ``J v`` comes from whichever is faster here: the double-backward pass of :class:`UnrolledJacobian` or the
    forward-mode ``P Jθ`` of :mod:`kpflow.kernels`. ``choice`` is a dict shared across steps: on the first two
    products both are timed on the same probes (their results agree to rounding; the tests check both against
    ``jacrev``; the first call of each is a warm-up) and the faster one is kept.
    """

    def __init__(self, unrolled: UnrolledJacobian, traj, names: Sequence[str], choice: dict):
        super().__init__(unrolled.shape_in, unrolled.shape_out, unrolled.dtype, unrolled.device)
        self.unrolled, self.traj, self.names, self.choice = unrolled, traj, tuple(names), choice
        self.gradient = unrolled.gradient

    def _kernels(self):
            return propagator(self.traj) @ param_jacobian(self.traj, list(self.names))

    def _matmat(self, V):
        backend = self.choice.get("jvp")
        if backend == "unrolled":
            return self.unrolled._matmat(V)
        if backend == "kernels":
            return self._kernels()._matmat(V)
        t0 = time.perf_counter()
        out = self.unrolled._matmat(V)
        t1 = time.perf_counter()
        try:
            self._kernels()._matmat(V)
        except Exception:  # noqa: BLE001 - a model the kernels cannot linearise: keep autodiff
            self.choice["jvp"] = "unrolled"
            return out
        t2 = time.perf_counter()
        trials = self.choice.get("trials", 0) + 1  # the first call of each is a warm-up (lazy setup)
        self.choice.update(trials=trials, seconds={"unrolled": t1 - t0, "kernels": t2 - t1})
        if trials >= 2:
            self.choice["jvp"] = "kernels" if (t2 - t1) < (t1 - t0) else "unrolled"
        return out

    def _rmatmat(self, Y):
        return self.unrolled._rmatmat(Y)


def record_for_step(model, names: Sequence[str], inputs, targets, *, mask=None, loss="mse", z0=None):
    """Record a batch for one optimizer step.

    The gradient ``J* e`` comes from the same backward pass as ``e = ∂L/∂z`` (as in SGD), so a step that
    reuses its basis costs no product beyond it.

    Args:
        model: the recurrent model.
        names: the cell parameters the step updates.
        inputs: ``[B, T, I]``.
        targets: the loss targets (as for ``kpflow.kernels.record``).
        mask: optional loss mask.
        loss: a loss name or callable (as for ``kpflow.kernels.record``).
        z0: initial state ``[B, H]`` (None: the model's own).

    Returns:
        ``(traj, J)``: a :class:`kpflow.kernels.Trajectory` (without the adjoint, which the step does not
        need; ``traj.loss`` and ``e`` filled in) and the :class:`UnrolledJacobian` whose forward pass
        produced it, with ``J.gradient = J* e``.

    Raises:
        FloatingPointError: the states became non-finite on this batch.
    """
    model.check_inputs(inputs, z0)
    inputs = inputs.detach()
    if z0 is None:
        z0 = model.initial_state(inputs.shape[0], inputs.dtype, inputs.device)
    params = {k: v.detach() for k, v in model.cell_params().items()}
    J = UnrolledJacobian(model, params, names, inputs, z0.detach())
    states = J.states.detach()
    if not bool(torch.isfinite(states).all()):
        raise FloatingPointError("the model's states became non-finite on this batch; lower the learning rate "
                                 "or the damping's lower bound, or raise the trust_region clip")
    rp = {k: v.detach() for k, v in model.readout_params().items()}
    with torch.enable_grad():  # one backward pass gives e = ∂L/∂z, ∂L/∂y and the gradient J* e
        y = model.output(J._out, rp)
        value = loss_value(y, targets, loss, mask)
        e, e_y, *grads = torch.autograd.grad(value, [J._out, y, *J._leaves], retain_graph=True,
                                             allow_unused=True)
    J.gradient = torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                            for g, leaf in zip(grads, J._leaves, strict=True)])
    with torch.no_grad():
        outputs = model.output(states, rp)
    traj = Trajectory(model=model, params=params, inputs=inputs, z0=z0.detach(), states=states, outputs=outputs,
                      targets=targets, mask=mask, error=e.detach(), adjoint=None, loss=float(value.detach()),
                      param_names=tuple(names))
    traj.cache["unrolled_jacobian"] = J
    traj.cache["loss"] = loss
    traj.cache["output_error"] = e_y.detach()
    return traj, J



def output_error(traj) -> torch.Tensor:
    """``∂L/∂y`` of the recorded loss (kept by ``record_for_step``, else recomputed from the outputs).

    Args:
        traj: a recorded trajectory with ``targets`` (the loss is ``traj.cache["loss"]``, MSE by default).

    Returns:
        ``∂L/∂y``, the shape of ``traj.outputs``.
    """
    cached = traj.cache.get("output_error") if hasattr(traj, "cache") else None
    if cached is not None:
        return cached
    with torch.enable_grad():
        y = traj.outputs.detach().clone().requires_grad_(True)
        value = loss_value(y, traj.targets, traj.cache.get("loss", "mse"), traj.mask)
        (e_y,) = torch.autograd.grad(value, y)
    return e_y
