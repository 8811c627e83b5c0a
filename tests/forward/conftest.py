"""Shared fixtures of the forward-planning tests: a coarse water box shaped like a pelvis
(300 mm wide, 200 mm deep, 150 mm long) with a 40 mm cubic target at its centre, a ring
(body minus the target grown by 30 mm) and a four-field box (AP, LL, PA, RL; open 60 x 60
mm) whose dose per MU is computed once per session."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Beam, PointOfInterest, Structure, StructureKind
from ids_engine.phantoms import water_box
from ids_engine.phantoms._boxes import broadcast_axes
from ids_engine.planning import BeamDoses, BeamField, Plan

BOX_SIZE_MM = (300.0, 200.0, 150.0)
FIELD = BeamField((-30.0, 30.0), (-30.0, 30.0))


def box_patient():
    p = water_box("coarse", size_mm=BOX_SIZE_MM)
    x, y, z = broadcast_axes(p.grid)
    ptv = (np.abs(x) <= 20 + 1e-6) & (np.abs(y) <= 20 + 1e-6) & (np.abs(z) <= 20 + 1e-6)
    p = p.with_structures(Structure("PTV", StructureKind.TARGET, ptv, p.grid, (1.0, 0.0, 0.0)))
    p = p.new_structure_from("RING", "BODY", subtract_names=["PTV"], subtract_margins_mm=[30.0], kind="oar")
    return p.with_points(PointOfInterest("P1", (0.0, 30.0, 0.0)))


def box_plan(name: str = "box") -> Plan:
    beams = tuple(Beam(name=n, gantry_deg=g) for n, g in (("AP", 0), ("LL", 90), ("PA", 180), ("RL", 270)))
    return Plan(name, beams, (FIELD,) * 4)


@pytest.fixture(scope="session")
def box():
    """(patient, plan, BeamDoses) of the four-field box."""
    patient = box_patient()
    plan = box_plan()
    return patient, plan, BeamDoses(patient, plan)
