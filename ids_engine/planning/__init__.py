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

# Forward planning (issue 12): beam operations, arcs, Make Conformed Beams.
from ._beams import (  # noqa: E402
    copy_beam, find_beam, mirror_aperture, mirror_field, mirror_fluence, mirror_fluence_grid, move_isocentres, new_beam,
    parallel_opposed, unique_name,
)
from ._arcs import Arc, arc_angles, arc_direction, simulate_arcs  # noqa: E402
from ._conformal import (  # noqa: E402
    LEAF_MODES, BEVProjection, ConformedBeam, aperture_area_mm2, conformed_fluences, fit_aperture,
    make_conformed_beams, project_structure,
)
__all__ += ["Arc", "BEVProjection", "ConformedBeam", "LEAF_MODES", "aperture_area_mm2", "arc_angles",  # noqa: E402
            "arc_direction", "conformed_fluences", "copy_beam", "find_beam", "fit_aperture", "make_conformed_beams",
            "mirror_aperture", "mirror_field", "mirror_fluence", "mirror_fluence_grid", "move_isocentres", "new_beam",
            "parallel_opposed", "project_structure", "simulate_arcs", "unique_name"]
