"""Normalisation points, the three prescription modes, whole MU and the dose-per-MU cache."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Beam, PointOfInterest
from ids_engine.phantoms import water_box
from ids_engine.planning import (
    BeamDoses, BeamField, DoseToNormalisation, DoseToPoints, MonitorUnits, Plan, PointRef, PrescriptionError,
    apply_prescription, compute_mu, nominal_dmax_mm,
)

from .conftest import box_plan


def test_calibration_gives_100_mu_for_1_gy_at_dmax_of_10x10_at_ssd_100():
    """The engine's calibration (1 cGy/MU at dmax, 10 x 10 cm, SSD 100 cm) seen through the
    prescription: 1 Gy at the dmax point of such a beam needs 100 MU."""
    patient = water_box("coarse", size_mm=(300.0, 300.0, 300.0))
    beam = Beam(name="AP", gantry_deg=0, isocentre_mm_xyz=(0.0, -150.0, 0.0))  # isocentre on the surface: SSD 1000 mm
    plan = Plan("cal", (beam,), (BeamField((-50.0, 50.0), (-50.0, 50.0)),), normalisation=PointRef("dmax", 0))
    doses = BeamDoses(patient, plan)
    assert doses.engine.geometry[0].ssd_mm == pytest.approx(1000.0)
    dmax = PointRef("dmax", 0).position_mm_xyz(plan, patient)
    assert np.allclose(dmax, (0.0, -135.0, 0.0))
    res = compute_mu(plan, patient, doses, DoseToPoints((1.0,), (PointRef("dmax", 0),)))
    assert res.mu_exact[0] == pytest.approx(100.0, abs=1.5)
    assert res.mu == (round(res.mu_exact[0]),)


def test_dmax_points_and_nominal_depths(box):
    patient, plan, _ = box
    # Anterior surface y = -100, left surface x = +150 (gantry 90 comes from the patient's left).
    assert np.allclose(PointRef("dmax", 0).position_mm_xyz(plan, patient), (0.0, -85.0, 0.0))
    assert np.allclose(PointRef("dmax", 1).position_mm_xyz(plan, patient), (135.0, 0.0, 0.0))
    assert np.allclose(PointRef("isocentre", 2).position_mm_xyz(plan, patient), (0.0, 0.0, 0.0))
    assert np.allclose(PointRef("point", label="P1").position_mm_xyz(plan, patient), (0.0, 30.0, 0.0))
    assert nominal_dmax_mm(6) == 15.0 and nominal_dmax_mm(18) == 32.0 and 15.0 < nominal_dmax_mm(7) < 20.0
    with pytest.raises(PrescriptionError, match=r"no point of interest 'Q'; the patient's points: ISO, P1"):
        PointRef("point", label="Q").position_mm_xyz(plan, patient)
    with pytest.raises(PrescriptionError, match="has 4 beams"):
        PointRef("isocentre", 7).position_mm_xyz(plan, patient)
    with pytest.raises(ValueError, match="needs the label"):
        PointRef("point")


def test_dose_to_points_whole_mu_and_doses_of_the_rounded_mu(box):
    patient, plan, doses = box
    rx = DoseToPoints((0.5, 0.5, 0.5, 0.5))
    res = compute_mu(plan, patient, doses, rx)
    rate = doses.at_points(np.zeros((1, 3)))[0]  # every beam's point is the common isocentre
    assert np.allclose(res.mu_exact, 0.5 / rate)
    assert res.mu == tuple(float(np.rint(0.5 / r)) for r in rate)
    for b in range(4):
        assert res.beam_dose_gy[b] == pytest.approx(res.mu[b] * rate[b])  # the dose of the whole MU ...
        assert abs(res.beam_dose_gy[b] - 0.5) <= rate[b] / 2 + 1e-12  # ... within half an MU of what was asked
    assert res.point_total_gy[0] == pytest.approx(float(np.dot(res.mu, rate)))
    # AP/PA need fewer MU than the laterals: less water in front of the isocentre (100 against 150 mm).
    assert res.mu[0] < res.mu[1] and res.mu[0] == res.mu[2] and res.mu[1] == res.mu[3]


def test_monitor_units_point_dose_agrees_with_the_dose_cube(box):
    patient, plan, doses = box
    res = compute_mu(plan, patient, doses, MonitorUnits((50, 60.4, 70, 80)))
    assert res.mu == (50.0, 60.0, 70.0, 80.0)  # whole MU
    cube = doses.dose(res.mu)
    k, j, i = patient.grid.nearest_index(np.zeros(3))
    assert res.point_total_gy[0] == pytest.approx(float(cube[k, j, i]), rel=0.01)


def test_dose_to_normalisation_point_at_a_percentage_with_weights(box):
    patient, plan, doses = box
    rx = DoseToNormalisation(2.0, (2.0, 1.0, 2.0, 1.0), percent=95.0)
    assert rx.normalisation_dose_gy == pytest.approx(2.0 / 0.95)
    res = compute_mu(plan, patient, doses, rx)
    rate = doses.at_points(np.zeros((1, 3)))[0]
    exact = np.asarray(res.mu_exact)
    # 95 % of the normalisation point's dose is 2 Gy (exact MU) ...
    assert float(exact @ rate) * 0.95 == pytest.approx(2.0, rel=1e-9)
    # ... shared 2:1:2:1 among the beams at their weight points.
    own = exact * rate
    assert own / own[1] == pytest.approx([2.0, 1.0, 2.0, 1.0], rel=1e-9)
    # Reported doses are those of the whole MU.
    assert res.normalisation_gy == pytest.approx(float(np.dot(res.mu, rate)))
    assert abs(res.normalisation_gy - 2.0 / 0.95) <= 0.5 * rate.sum()
    # Normalising at another point (P1, off the axis of AP/PA) changes the MU accordingly.
    res_p1 = compute_mu(plan.changed(normalisation=PointRef("point", label="P1")), patient, doses, rx)
    r1 = doses.at_points([[0.0, 30.0, 0.0]])[0]
    assert float(np.asarray(res_p1.mu_exact) @ r1) == pytest.approx(2.0 / 0.95, rel=1e-9)


def test_apply_prescription_is_one_dose_change(box):
    patient, plan, doses = box
    new, res = apply_prescription(plan, patient, doses, DoseToPoints((0.5,) * 4))
    assert new.plan_id == plan.plan_id + 1 and new.mu == res.mu and isinstance(new.prescription, DoseToPoints)
    same, _ = apply_prescription(new, patient, doses)  # the same prescription again: no change
    assert same.plan_id == new.plan_id


def test_prescription_errors_name_the_beam_and_the_point(box):
    patient, plan, doses = box
    with pytest.raises(PrescriptionError, match="3 values for 4 beams"):
        compute_mu(plan, patient, doses, MonitorUnits((1, 2, 3)))
    far = patient.with_points(PointOfInterest("FAR", (0.0, 0.0, 900.0)))  # outside the grid: no dose
    rx = DoseToPoints((0.5,) * 4, (PointRef("point", label="FAR"), None, None, None))
    with pytest.raises(PrescriptionError, match=r"beam 'AP' gives no dose to its point \(point FAR\)"):
        compute_mu(plan, far, doses, rx)
    with pytest.raises(ValueError, match="at least one value must be positive"):
        DoseToNormalisation(2.0, (0, 0, 0, 0))
    other = box_plan().changed(fields=(BeamField((-10, 10), (-10, 10)),) * 4)
    with pytest.raises(PrescriptionError, match="beams changed"):
        compute_mu(other, patient, doses, MonitorUnits((1, 1, 1, 1)))


def test_beam_doses_cache_runs_the_engine_once_per_beam(box):
    patient, plan, doses = box
    start = doses.engine_passes
    assert start >= 4
    doses.at_points([[0.0, 0.0, 0.0], [0.0, -85.0, 0.0], [0.0, 30.0, 0.0]])  # isocentre, a dmax point, P1: known
    a = doses.samples("PTV", patient.structure("PTV").mask)
    assert doses.samples("PTV", patient.structure("PTV").mask) is a
    assert doses.engine_passes == start
    doses.at_points([[5.0, 5.0, 5.0]])  # a new point: one pass per beam
    assert doses.engine_passes == start + 4
    # Linearity: a sum of per-beam cubes is the engine's dose of all beams together.
    eng = doses.engine
    eng.set_fluences([f * m for f, m in zip(doses.unit_fluences, (10, 20, 30, 40))])
    assert np.allclose(eng.dose_cube_host(), doses.dose((10, 20, 30, 40)), atol=1e-5 * 40)


def test_monitor_units_report_at_chosen_points_and_percent_reference(box):
    from ids_engine.planning import normalisation_dose_gy

    patient, plan, doses = box
    rx = MonitorUnits((100, 0, 0, 0), (PointRef("dmax", 0), None, None, None))
    new, res = apply_prescription(plan, patient, doses, rx)
    r_dmax = doses.at_points(PointRef("dmax", 0).position_mm_xyz(plan, patient)[None])[0, 0]
    assert res.beam_dose_gy[0] == pytest.approx(100 * r_dmax)
    # At SSD 900 mm the dmax dose per MU exceeds 1 cGy by about the inverse square (1015/915)^2.
    assert 100 * r_dmax == pytest.approx((1015 / 915) ** 2, rel=0.06)
    # 100 % is the normalisation point's dose (here the isocentre) for the plan's MU.
    assert normalisation_dose_gy(new, patient, doses) == pytest.approx(res.normalisation_gy)
    assert res.normalisation_gy == pytest.approx(100 * doses.at_points(np.zeros((1, 3)))[0, 0])
