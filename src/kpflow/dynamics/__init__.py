"""Dynamics of recurrent models: fixed points, continuation, bifurcations, normal forms and the bifurcation channel."""

from .bifurcations import (
    BifurcationEvent,
    BifurcationHistory,
    BifurcationScan,
    bialternate_product,
    bifurcation_test_functions,
    check_same_architecture,
    classify_crossing,
    find_bifurcations,
    interpolate_params,
    track_bifurcations,
)
from .channels import (
    ChannelDecomposition,
    JacobianSummary,
    NormalFormMatch,
    bifurcation_channel,
    critical_subspace,
    jacobian_summary,
    normal_form_match,
)
from .continuation import (
    Branch,
    ContinuationError,
    ContinuationResult,
    ParameterPath,
    SpecialPoint,
    continue_fixed_points,
    custom_path,
    gain_path,
    input_path,
    interpolation_path,
    learning_along_branch,
    parameter_path,
)
from .fixedpoints import (
    ConstantInputMap,
    FixedPoints,
    NoFixedPointError,
    classify_spectrum,
    constant_input_map,
    eig_with_left,
    find_fixed_points,
    newton_polish,
    stability_margin,
)
from .normal_forms import (
    NORMAL_FORMS,
    AmplificationLandscape,
    FlipMap,
    NeimarkSackerMap,
    NormalFormMap,
    PitchforkMap,
    SaddleNodeMap,
    TranscriticalMap,
    amplification_landscape,
    greens_matrix,
    mu_sensitivity,
    normal_form,
)

__all__ = [
    "Branch", "ContinuationError", "ContinuationResult", "ParameterPath", "SpecialPoint", "continue_fixed_points",
    "custom_path", "gain_path", "input_path", "interpolation_path", "learning_along_branch", "parameter_path",
    "ChannelDecomposition", "JacobianSummary", "NormalFormMatch", "bifurcation_channel", "critical_subspace",
    "jacobian_summary", "normal_form_match",
    "BifurcationEvent", "BifurcationHistory", "BifurcationScan", "bialternate_product", "check_same_architecture",
    "classify_crossing", "find_bifurcations", "interpolate_params", "bifurcation_test_functions", "track_bifurcations",
    "ConstantInputMap", "FixedPoints", "NoFixedPointError", "classify_spectrum", "constant_input_map",
    "eig_with_left", "find_fixed_points", "newton_polish", "stability_margin",
    "NORMAL_FORMS", "AmplificationLandscape", "FlipMap", "NeimarkSackerMap", "NormalFormMap", "PitchforkMap",
    "SaddleNodeMap", "TranscriticalMap", "amplification_landscape", "greens_matrix", "mu_sensitivity", "normal_form",
]
