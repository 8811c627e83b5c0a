"""Qualification decisions both ways, on comparisons with known deltas."""

from __future__ import annotations

import math

from ids_engine.adapt import default_tolerance, qualify


def _comparison(ptv_d95_delta_gy=0.0, oar_mean_delta_gy=0.0, gamma3=100.0, gamma2=100.0, missing=()):
    def row(a, d, unit="Gy"):
        return {"approved": a, "new": a + d, "delta": d, "unit": unit, "delta_pct_rx": 100 * d / 60, "reported": True}

    return {"prescription_gy": 60.0, "missing": list(missing),
            "structures": {
                "PTV": {"kind": "target", "metrics": {m: row(60.0, ptv_d95_delta_gy if m == "D95" else 0.0)
                                                      for m in ("D98", "D95", "D50", "D2", "mean")}
                        | {"V95": row(95.0, 0.0, "%")}},
                "OAR": {"kind": "oar", "metrics": {"mean": row(30.0, oar_mean_delta_gy), "D2": row(50.0, 0.0),
                                                   "max": row(55.0, 0.0)}},
                "BODY": {"kind": "external", "metrics": {"max": row(70.0, 30.0)}}},
            "gamma": {"3%/3mm": {"pass_rate_pct": gamma3}, "2%/2mm": {"pass_rate_pct": gamma2}}}


def test_within_tolerance_is_auto_qualified():
    # D95 down by 1.79 Gy = 2.98 % of Rx (limit 3 %), OAR mean up 1.79 Gy (limit 3 %), gamma at the minimums;
    # the body (external) is not checked by the default profile however far it moves.
    q = qualify(_comparison(-1.79, 1.79, 95.0, 90.0), default_tolerance())
    assert q.auto_qualified and q.reasons == ()
    assert {c["item"] for c in q.checks} >= {"PTV D95", "OAR mean", "gamma 3%/3mm", "gamma 2%/2mm"}
    assert not any(c["item"].startswith("BODY") for c in q.checks)
    assert q.to_dict()["auto_qualified_for_review"] is True


def test_every_failure_is_listed():
    q = qualify(_comparison(-1.81, 2.5, 94.9, 80.0, missing=("Rectum",)), default_tolerance())
    assert not q.auto_qualified
    text = "\n".join(q.reasons)
    assert len(q.reasons) == 5
    assert "Rectum: the approved structure is missing" in text
    assert "PTV D95: 60.00 -> 58.19 Gy, delta -3.02 % of Rx exceeds 3 % of Rx" in text
    assert "OAR mean" in text and "gamma 3%/3mm: pass rate 94.9 %" in text and "gamma 2%/2mm" in text


def test_gamma_not_evaluated_and_fiducial_residual_fail():
    comp = _comparison()
    comp["gamma"]["3%/3mm"]["pass_rate_pct"] = math.nan
    q = qualify(comp, default_tolerance(), registration_kind="fiducial", registration_metrics={"rms_residual_mm": 2.5})
    assert not q.auto_qualified
    assert any("not evaluated" in r for r in q.reasons)
    assert any("RMS marker residual 2.50 mm exceeds 2 mm" in r for r in q.reasons)
    # The residual only counts for a fiducial registration.
    assert qualify(_comparison(), default_tolerance(), registration_kind="rigid",
                   registration_metrics={"rms_residual_mm": 9.0}).auto_qualified


def test_own_contours_are_checked_too():
    q = qualify(_comparison(), default_tolerance(), own_contours=_comparison(-6.0))
    assert not q.auto_qualified
    assert q.reasons == ("own contours: PTV D95: 60.00 -> 54.00 Gy, delta -10.00 % of Rx exceeds 3 % of Rx",)


def test_a_profile_that_checks_nothing_never_qualifies():
    """A structure limit under a name the plan does not have (a misspelt 'Rectum' for
    'RECTUM') fails naming it; a profile with no applicable limit at all does not qualify; a
    fiducial registration without a residual fails its residual check."""
    from dataclasses import replace

    from ids_engine.adapt._tolerance import Limit

    only_rectum = replace(default_tolerance(), kind_limits={}, gamma_min_pass_pct={},
                          structure_limits={"Rectum": {"max": Limit("max", "gy", 1.5)}})
    q = qualify(_comparison(), only_rectum)
    assert not q.auto_qualified
    assert any(r.startswith("Rectum: the tolerance profile has limits for it") for r in q.reasons)
    nothing = replace(default_tolerance(), kind_limits={}, gamma_min_pass_pct={}, structure_limits={})
    q = qualify(_comparison(), nothing)
    assert not q.auto_qualified and q.reasons == ("the tolerance profile checked nothing (no limit applies to this plan)",)
    q = qualify(_comparison(), default_tolerance(), registration_kind="fiducial", registration_metrics={})
    assert q.reasons == ("fiducial registration: no marker residual to check",)
