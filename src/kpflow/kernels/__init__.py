"""State-space operators of a recorded run.

Jθ, K, A, S, P, P⁻¹, J = P Jθ, Θ = P K P*, C Θ C*, the state-space Fisher, and the exact Kronecker core of K for
weight-based cells — for recurrences in their Schur-complement form on the states, for every site model (MLP,
transformer, adapted nn.Module) on the joint state of the global implicit constraint (``kpflow.kernels.joint``).
"""

from .joint import (
    InverseJointPropagator,
    JointPropagator,
    SiteKroneckerCore,
    SiteParamJacobian,
    SiteTrajectory,
    VisibleSelection,
    joint_propagator,
    record_sites,
    site_kronecker_core,
)
from .kronecker import KroneckerCore, KroneckerKernel, kronecker_core, supports_kronecker
from .recording import record
from .state_space import (
    InversePropagator,
    ParamJacobian,
    ParamLayout,
    Propagator,
    ReadoutJacobian,
    StepJacobianCache,
    StepJacobians,
    TimeShift,
    dense_step_jacobians,
    inverse_propagator,
    ntk,
    output_ntk,
    param_jacobian,
    parameter_operator,
    propagator,
    readout_jacobian,
    state_fisher,
    state_jacobian,
    step_jacobians,
    time_shift,
)
from .trajectory import NonFiniteStateError, RecordedRun, Trajectory, loss_value, resolve_param_names, snapshot

__all__ = [
    "record", "RecordedRun", "Trajectory", "NonFiniteStateError", "resolve_param_names", "loss_value", "snapshot",
    "param_jacobian", "parameter_operator", "step_jacobians", "time_shift", "propagator",
    "inverse_propagator", "readout_jacobian", "state_jacobian", "ntk", "output_ntk", "state_fisher",
    "dense_step_jacobians", "kronecker_core", "supports_kronecker",
    "ParamJacobian", "ParamLayout", "StepJacobians", "StepJacobianCache", "TimeShift", "Propagator",
    "InversePropagator", "ReadoutJacobian", "KroneckerCore", "KroneckerKernel",
    "SiteTrajectory", "record_sites", "SiteParamJacobian", "JointPropagator", "InverseJointPropagator",
    "VisibleSelection", "SiteKroneckerCore", "site_kronecker_core", "joint_propagator",
]
