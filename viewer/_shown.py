"""A plan other than the shaping session's, to display in the main window (no Qt).

Seed 001 lets the planner display a plan in the frames and says that the plan ID "is also
displayed on all the 2d and 3d frames where the plan is displayed", so that a print-out can
be matched to a screen print. :class:`ShownPlan` is what the forward-planning dialog hands to
the main window for that: the plan's name and ID, the dose that 100 % means (its
normalisation point's dose), and a function that gives the dose cube. The window passes it
to its engine worker, which calls :attr:`ShownPlan.dose` on the worker's thread and builds the
snapshots (slices, isodoses, DVHs, metrics, the 3D surface) from that dose instead of the
session's, until the window shows the session's dose again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["ShownPlan"]


@dataclass(frozen=True, eq=False)
class ShownPlan:
    """A forward plan to display.

    Parameters
    ----------
    name : the plan's name.
    plan_id : its plan ID (seed 001: it increments with every dose-affecting change).
    reference_gy : the dose that 100 % means in the display (the normalisation point's dose
        for the plan's MU); isodose levels, the colour wash and % read-outs refer to it.
    dose : called once on the worker's thread: host (z, y, x) float32 Gy on the session's
        grid (e.g. ``functools.partial(BeamDoses.dose, plan.mu)``).
    patient : the patient whose points are drawn with their dose (the dialog's, which may hold
        points the session's patient lacks); None: the session's.
    reference_note : how ``reference_gy`` was chosen, for the status bar.
    """

    name: str
    plan_id: int
    reference_gy: float
    dose: Callable[[], np.ndarray]
    patient: object = None
    reference_note: str = "normalisation point"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.reference_gy) and self.reference_gy > 0):
            raise ValueError(f"ShownPlan {self.name!r}: reference_gy must be positive, got {self.reference_gy!r}")

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, int(self.plan_id))

    @property
    def label(self) -> str:
        """How the title, the status bar and the DVH legend name it."""
        return f"forward plan {self.name!r}, plan ID {self.plan_id}"

    @property
    def frame_tag(self) -> str:
        """How each frame's header names it (short: it leads the header)."""
        return f"{self.name} · plan ID {self.plan_id}"
