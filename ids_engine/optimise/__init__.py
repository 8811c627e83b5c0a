"""Inverse planning: goals per structure, protocol files, fluence-map optimisation.

Goals (frozen dataclasses; doses in Gy, volumes in percent) are objectives (met as far as
their importances allow) or constraints (must be met). :func:`optimise_fluence` finds
non-negative beamlet weights for them on an influence matrix (L-BFGS-B, constraints by an
augmented Lagrangian) and reports any constraint it could not meet by name and amount.
:func:`read_protocol` reads goals from a TOML protocol file; :func:`protocol_from_matrad`
converts matRad ``cst`` objectives as the matRad reader keeps them. :func:`tune_importance`
adjusts objectives' importance factors with Powell's method to improve a DVH score (Xing
et al. 1999). :func:`sample_rows` picks weighted rows of large structures (:class:`RowSampling`)
so that goals on the whole body stay affordable.
"""

from . import _goals
from ._goals import *  # noqa: F401,F403 (the names in its __all__)
from ._importance import (
    ImportanceTuning,
    TuningStep,
    dvh_score,
    goal_shortfall_gy,
    score_goals_from_checks,
    tune_importance,
)
from ._optimiser import FluenceResult, UnmetConstraint, optimise_fluence
from ._rows import RowSampling, SampledRows, sample_rows
from ._protocol import Protocol, dvh_goal, goals_from_matrad, protocol_from_matrad, read_protocol

__all__ = [
    *_goals.__all__,
    "FluenceResult",
    "Protocol",
    "RowSampling",
    "SampledRows",
    "UnmetConstraint",
    "dvh_goal",
    "goals_from_matrad",
    "optimise_fluence",
    "protocol_from_matrad",
    "read_protocol",
    "sample_rows",
    "ImportanceTuning",
    "TuningStep",
    "dvh_score",
    "goal_shortfall_gy",
    "score_goals_from_checks",
    "tune_importance",
]
