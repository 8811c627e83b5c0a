"""Planning tools: beam set-ups, starting fluences and inverse planning."""

from ._inverse import InversePlan, goal_checks, optimise_plan, structure_rows, target_beamlets
from ._open_field import conformal_aperture, equispaced_beams

__all__ = ["InversePlan", "conformal_aperture", "equispaced_beams", "goal_checks", "optimise_plan", "structure_rows", "target_beamlets"]

# Forward planning (issue 12): plans and plan book, prescription and MU, auto weight x4.
from ._plan import BeamField, Plan, PlanBook, PlanBookError  # noqa: E402
from ._prescription import (  # noqa: E402
    BeamDoses, DoseToNormalisation, DoseToPoints, MonitorUnits, MUResult, PointRef, PrescriptionError,
    apply_prescription, compute_mu, nominal_dmax_mm, normalisation_dose_gy,
)
from ._autoweight import (  # noqa: E402
    AUTO_WEIGHT_METHODS, AutoWeightInfeasible, AutoWeightProblem, AutoWeightResult, UpperLimitSearch, VolumeGoal,
    Violation, auto_weight, objective, objective_terms, search_upper_limit, solve_annealing, solve_cimmino,
    solve_downhill, solve_simplex,
)
__all__ += ["AUTO_WEIGHT_METHODS", "AutoWeightInfeasible", "AutoWeightProblem", "AutoWeightResult", "BeamDoses",  # noqa: E402
            "BeamField", "DoseToNormalisation", "DoseToPoints", "MUResult", "MonitorUnits", "Plan", "PlanBook",
            "PlanBookError", "PointRef", "PrescriptionError", "UpperLimitSearch", "Violation", "VolumeGoal",
            "apply_prescription", "auto_weight", "compute_mu", "nominal_dmax_mm", "normalisation_dose_gy", "objective", "objective_terms",
            "search_upper_limit", "solve_annealing", "solve_cimmino", "solve_downhill", "solve_simplex"]
