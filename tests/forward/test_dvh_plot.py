"""DVHs of several plans together (seed 001's DVH popup): curves per (plan, structure), colour
per structure, line style per plan, exact or sampled, written as PNG."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.evaluation import exact_dvh
from ids_engine.evaluation._dvh_plot import plan_dvh_curves, plans_dvh_png


def test_curves_of_two_plans_exact_and_sampled(box, tmp_path):
    patient, plan, doses = box
    mu = np.array([80.0, 60.0, 80.0, 60.0])
    cubes = {"A (plan ID 2)": doses.dose(mu), "B (plan ID 3)": doses.dose(2.0 * mu)}
    ptv, ring = patient.structure("PTV"), patient.structure("RING")
    curves = plan_dvh_curves(cubes, [ptv, ring], patient.grid, bin_gy=0.01)
    assert [(c.plan, c.dvh.name) for c in curves] == [(p, s) for p in cubes for s in ("PTV", "RING")]
    assert curves[0].colour == curves[2].colour == tuple(ptv.colour) != curves[1].colour
    # Each curve is the structure's exact DVH of that plan's dose; twice the MU, twice the dose.
    want = exact_dvh("RING", cubes["B (plan ID 3)"], ring.mask, patient.grid, bin_gy=0.01)
    np.testing.assert_allclose(curves[3].dvh.volume_fraction, want.volume_fraction)
    for a, b in ((curves[0], curves[2]), (curves[1], curves[3])):
        d_a = np.interp(0.5, a.dvh.volume_fraction[::-1], a.dvh.dose_gy[::-1])
        d_b = np.interp(0.5, b.dvh.volume_fraction[::-1], b.dvh.dose_gy[::-1])
        assert d_b == pytest.approx(2.0 * d_a, abs=0.03)
    # Random sampling to 1 point per mm^3 lands within a few % of volume of the exact curve.
    sampled = plan_dvh_curves([("A", cubes["A (plan ID 2)"])], [("PTV", ptv.mask)], patient.grid, method="sampled",
                              bin_gy=0.01, seed=1)
    a = curves[0].dvh.volume_fraction
    s = sampled[0].dvh.volume_fraction
    n = min(len(a), len(s))
    assert np.max(np.abs(a[:n] - s[:n])) < 0.03 and sampled[0].plan == "A"
    path = plans_dvh_png(tmp_path / "dvh.png", curves, volume="cc", title="two plans")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_named(box):
    patient, _, doses = box
    d = doses.dose([1, 1, 1, 1])
    with pytest.raises(ValueError, match="DVH method"):
        plan_dvh_curves({"A": d}, [patient.structure("PTV")], patient.grid, method="fast")
    with pytest.raises(ValueError, match="named twice"):
        plan_dvh_curves([("A", d), ("A", d)], [patient.structure("PTV")], patient.grid)
    with pytest.raises(ValueError, match="no plans"):
        plan_dvh_curves({}, [patient.structure("PTV")], patient.grid)
