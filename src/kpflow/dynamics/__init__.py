"""Dynamics of recurrent models: fixed points, bifurcations, normal forms and the bifurcation channel."""

from .bifurcations import (
    BifurcationEvent,
    BifurcationHistory,
    BifurcationScan,
    bialternate_product,
    check_same_architecture,
    classify_crossing,
    find_bifurcations,
    interpolate_params,
    test_functions,
    track_bifurcations,
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
    "BifurcationEvent", "BifurcationHistory", "BifurcationScan", "bialternate_product", "check_same_architecture",
    "classify_crossing", "find_bifurcations", "interpolate_params", "test_functions", "track_bifurcations",
    "ConstantInputMap", "FixedPoints", "NoFixedPointError", "classify_spectrum", "constant_input_map",
    "eig_with_left", "find_fixed_points", "newton_polish", "stability_margin",
    "NORMAL_FORMS", "AmplificationLandscape", "FlipMap", "NeimarkSackerMap", "NormalFormMap", "PitchforkMap",
    "SaddleNodeMap", "TranscriticalMap", "amplification_landscape", "greens_matrix", "mu_sensitivity", "normal_form",
]
