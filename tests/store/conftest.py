"""Fixtures of the plan store tests: a small coarse horseshoe session (2 beams, 4 mm
fluence pitch: a second to build, ~50 ms per request) and a fresh store."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from ids_engine.dose import EngineOptions
from ids_engine.session import Session, case_from_spec
from ids_engine.store import PlanStore

RX = 60.0
CASE = {"phantom": "horseshoe", "resolution": "coarse"}
OPTIONS = EngineOptions(fluence_pitch_mm=4.0)


@functools.lru_cache(maxsize=1)
def _patient():
    return case_from_spec(CASE)


def small_session(n_beams: int = 2) -> Session:
    return Session.open_field_plan(_patient(), n_beams=n_beams, prescription_gy=RX, engine_options=OPTIONS,
                                   case=CASE)


def target_voxel(s: Session, k: int = 0) -> tuple[int, int, int]:
    """The k-th voxel (in a fixed order) of the target's central slab."""
    t = np.argwhere(s.patient.targets[0].mask)
    t = t[t[:, 0] == int(np.median(t[:, 0]))]
    return tuple(int(v) for v in t[(k * 37) % len(t)])


@pytest.fixture(scope="module")
def base_session():
    return small_session()


@pytest.fixture
def session():
    """A fresh small session (a fresh one, not a shared one with its requests undone: undo is
    exact only up to float32 rounding, and a store records bit-exact hashes)."""
    s = small_session()
    yield s
    s.close()


@pytest.fixture
def store(tmp_path):
    with PlanStore.open(tmp_path / "store", user="planner") as st:
        yield st


@pytest.fixture
def patient_key(store, base_session):
    return store.add_patient(base_session.patient, patient_id="PID-0001", name="Doe^Jane")
