"""Planning tools: beam set-ups, starting fluences and inverse planning."""

from ._inverse import InversePlan, goal_checks, optimise_plan, structure_rows, target_beamlets
from ._open_field import conformal_aperture, equispaced_beams

__all__ = ["InversePlan", "conformal_aperture", "equispaced_beams", "goal_checks", "optimise_plan", "structure_rows", "target_beamlets"]
