"""Fixtures of the adaptive replanning tests: one approved plan on the coarse horseshoe,
made once per session (5 beams optimised for examples/adapt/horseshoe_protocol.toml, then
two shaping requests), saved as an `ids plan --out` folder (session/ + protocol.toml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "examples" / "adapt" / "horseshoe_protocol.toml"


@pytest.fixture(scope="session")
def approved_dir(tmp_path_factory) -> Path:
    from ids_engine.dmr import EraseSpot, SetVoxelDose
    from ids_engine.optimise import read_protocol
    from ids_engine.planning import equispaced_beams, optimise_plan
    from ids_engine.session import Session, case_from_spec

    out = tmp_path_factory.mktemp("approved")
    spec = {"phantom": "horseshoe", "resolution": "coarse"}
    patient = case_from_spec(spec)
    protocol = read_protocol(PROTOCOL)
    s = Session(patient, equispaced_beams(5, patient.targets[0].centroid_xyz()), prescription_gy=60.0, case=spec)
    plan = optimise_plan(s.engine, protocol.goals, max_iterations=100, tail_rounds=1)
    s.set_plan(plan.fluences)
    oar = patient.structure("OAR").mask
    # Erase the OAR's centre down to 85 % of its hottest voxel there (whatever the optimiser left).
    centre = tuple(np.argwhere(oar).mean(axis=0))
    zyx = np.argwhere(oar)
    near = np.linalg.norm((zyx - np.asarray(centre)) * np.asarray(patient.grid.spacing_mm_zyx), axis=1) <= 8.0
    hottest = float(s.dose()[tuple(zyx[near].T)].max()) if near.any() else float(s.dose()[oar].max())
    s.run(EraseSpot(centre, 8.0, 0.0, 0.85 * hottest, structure="OAR"))
    # The coldest PTV voxel up to 58 Gy (a request whose voxel the replay must move).
    ptv = patient.structure("PTV").mask
    dose = s.dose()
    cold = np.argwhere(ptv)[np.argmin(dose[ptv])]
    s.run(SetVoxelDose(tuple(int(v) for v in cold), 58.0))
    s.save(out / "session")
    s.close()
    shutil.copy(PROTOCOL, out / "protocol.toml")
    return out


@pytest.fixture(scope="session")
def approved(approved_dir):
    from ids_engine.adapt import load_approved_plan

    return load_approved_plan(approved_dir)
