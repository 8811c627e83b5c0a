"""DVH metrics (Dx%, Dxcc, VxGy, Dmean, Dmax, Dmin), metric expressions and CI / HI / GI
against hand-computed values on small synthetic doses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ids_engine.evaluation import (
    StructureDose,
    conformity_index,
    dvh_metrics,
    gradient_index,
    homogeneity_index,
    parse_metric,
)

ONE_TO_TEN = np.arange(1.0, 11.0)  # ten voxels, 1..10 Gy


def sd(d, voxel_cc=1.0):
    d = np.asarray(d, float)
    return StructureDose(d, np.ones(d.shape, bool), voxel_cc)


@pytest.mark.parametrize(("pct", "expected"), [(100, 1.0), (95, 1.0), (50, 6.0), (10, 10.0), (2, 10.0), (0, 10.0)])
def test_dose_to_percent_of_volume(pct, expected):
    # Sorted 1..10: D_pct = d[floor((1 - pct/100) * 10)].
    assert sd(ONE_TO_TEN).dose_at_volume_pct(pct) == expected


@pytest.mark.parametrize(
    ("cc", "expected"),
    [
        (1.0, 10.0),  # the hottest voxel
        (2.0, 9.0),  # two hottest voxels hold 2 cc: the second-hottest dose
        (2.5, 8.0),  # a partial voxel rounds up: three voxels
        (0.03, 10.0),
        (10.0, 1.0),  # the whole structure
        (20.0, 1.0),  # more than the structure: its minimum
    ],
)
def test_dose_to_cc(cc, expected):
    assert sd(ONE_TO_TEN).dose_at_volume_cc(cc) == expected


def test_dmax_and_dmin_are_near_extremes_of_0_03_cc():
    # 0.01 cc voxels: 0.03 cc is exactly three voxels (0.03 / 0.01 is 2.9999999999999996 in
    # floating point and must still count as three).
    s = sd(ONE_TO_TEN, voxel_cc=0.01)
    assert s.dmax() == 8.0  # third-hottest
    assert s.dmin() == 4.0  # all but the three coldest voxels receive it
    # 2 mm voxels (0.008 cc): 0.03 cc needs 3.75, i.e. four voxels.
    s = sd(ONE_TO_TEN, voxel_cc=0.008)
    assert s.dmax() == 7.0
    assert s.dmin() == 4.0  # floor(3.75) = 3 coldest voxels dropped
    # Voxels larger than 0.03 cc: the true extremes.
    s = sd(ONE_TO_TEN, voxel_cc=0.027)
    assert (s.dmax(), s.dmin()) == (9.0, 2.0)  # 0.03 cc needs two 0.027 cc voxels; one dropped
    s = sd(ONE_TO_TEN, voxel_cc=1.0)
    assert (s.dmax(), s.dmin()) == (10.0, 1.0)


def test_volume_at_dose_in_percent_and_cc():
    s = sd(ONE_TO_TEN, voxel_cc=0.5)
    assert s.volume_at_dose(5.0) == 60.0  # 5..10: dose at or above the level counts
    assert s.volume_at_dose(5.0, "cc") == 3.0
    assert s.volume_at_dose(5.5) == 50.0
    assert s.volume_at_dose(10.0, "cc") == 0.5
    assert s.volume_at_dose(10.1) == 0.0
    assert s.dmean() == 5.5


@pytest.mark.parametrize(
    ("text", "kind", "arg"),
    [
        ("D95", "dose_at_pct", 95.0),
        ("D95%", "dose_at_pct", 95.0),
        ("d2cc", "dose_at_cc", 2.0),
        ("D0.03cc", "dose_at_cc", 0.03),
        ("V20Gy", "volume_at_gy", 20.0),
        ("V95%", "volume_at_pct_rx", 95.0),
        ("Dmean", "mean", 0.0),
        ("DMAX", "max", 0.0),
        (" Dmin ", "min", 0.0),
    ],
)
def test_metric_expressions(text, kind, arg):
    m = parse_metric(text)
    assert (m.kind, m.argument) == (kind, arg)


@pytest.mark.parametrize("text", ["D", "D95x", "V20", "X20Gy", "D120", "Dmedian", "", "V20cc"])
def test_bad_metric_expressions_are_refused(text):
    with pytest.raises(ValueError, match="metric"):
        parse_metric(text)


def test_metric_evaluation_matches_the_methods():
    s = sd(ONE_TO_TEN)
    assert parse_metric("D2cc").evaluate(s) == 9.0
    assert parse_metric("Dmax").evaluate(s) == 10.0
    assert parse_metric("V5Gy").evaluate(s, volume_unit="cc") == 6.0
    assert parse_metric("V95%").evaluate(s, prescription_gy=10.0) == 10.0  # >= 9.5 Gy
    with pytest.raises(ValueError, match="prescription"):
        parse_metric("V95%").evaluate(s)


doses = arrays(np.float64, st.integers(1, 300), elements=st.floats(0.0, 80.0, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(doses, st.floats(0.001, 2.0), st.floats(0.0, 5.0))
def test_dose_to_cc_is_the_highest_dose_that_x_cc_receive(d, voxel_cc, cc):
    s = sd(d, voxel_cc)
    D = s.dose_at_volume_cc(cc)
    if cc <= s.volume_cc:
        assert np.count_nonzero(d >= D) * voxel_cc >= cc * (1 - 1e-9)
    # No higher dose is received by x cc (or the structure is smaller than x cc).
    assert np.count_nonzero(d > D) * voxel_cc < max(cc, voxel_cc) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(doses)
def test_percent_metrics_agree_with_dvh_metrics(d):
    s = sd(d)
    m = dvh_metrics(d, np.ones(d.shape, bool))
    for pct in (98, 95, 50, 2):
        assert s.dose_at_volume_pct(pct) == m[f"D{pct}_gy"]
    assert s.dose_at_volume_pct(100) == m["min_gy"]
    assert s.dose_at_volume_pct(0) == m["max_gy"]


# ---------------------------------------------------------------- indices

def _radius(n=21):
    z, y, x = np.indices((n, n, n)) - n // 2
    return np.sqrt(x * x + y * y + z * z)


def test_conformity_is_one_when_the_prescription_isodose_is_the_target():
    r = _radius()
    target = r <= 6
    dose = np.where(target, 60.0, 20.0)
    assert conformity_index(dose, target, 60.0) == 1.0
    assert homogeneity_index(dose, target) == 0.0


def test_conformity_of_spill_and_miss():
    target = np.zeros((4, 4, 4), bool)
    target[:, :, :2] = True  # 32 voxels
    whole = np.full(target.shape, 50.0)  # the isodose holds twice the target
    assert conformity_index(whole, target, 50.0) == pytest.approx(0.5)
    shifted = np.zeros(target.shape)
    shifted[:, :, 1:3] = 50.0  # half the target covered, as much spill
    assert conformity_index(shifted, target, 50.0) == pytest.approx(16**2 / (32 * 32))
    assert conformity_index(np.zeros(target.shape), target, 50.0) == 0.0
    # Limited to a region: spill outside it does not count.
    assert conformity_index(whole, target, 50.0, region=target) == 1.0


def test_homogeneity_index_by_hand():
    d = np.arange(1.0, 101.0)  # D2 = d[98] = 99, D98 = d[2] = 3, D50 = d[50] = 51
    assert homogeneity_index(d, np.ones(d.shape, bool)) == pytest.approx((99 - 3) / 51)


def test_gradient_index_of_nested_spheres():
    r = _radius()
    dose = np.where(r <= 4, 60.0, np.where(r <= 8, 30.0, 5.0))
    expected = np.count_nonzero(r <= 8) / np.count_nonzero(r <= 4)
    assert gradient_index(dose, 60.0) == pytest.approx(expected)
    assert gradient_index(dose, 70.0) == float("inf")
    assert gradient_index(dose, 60.0, region=r <= 6) == pytest.approx(
        np.count_nonzero(r <= 6) / np.count_nonzero(r <= 4))


def test_structure_dose_refuses_an_empty_structure_or_a_shape_mismatch():
    with pytest.raises(ValueError, match="empty"):
        StructureDose(np.zeros(4), np.zeros(4, bool), 1.0, "Lung")
    with pytest.raises(ValueError, match="shape"):
        StructureDose(np.zeros(4), np.ones(5, bool), 1.0)
