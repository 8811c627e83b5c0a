"""Auto-qualification (claim 8 of seed 003): a plan whose every difference from the approved
plan lies within the tolerance profile is qualified for review; otherwise every reason is
listed."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Qualification", "qualify"]


@dataclass(frozen=True)
class Qualification:
    """The decision and its evidence.

    auto_qualified : True when every check passed (the plan goes to review as
        auto-qualified; a person still approves it).
    reasons : one sentence per failed check (empty when qualified).
    checks : every check made: {item, value, limit, unit, passed}.
    profile : the tolerance profile's name and source.
    """

    auto_qualified: bool
    reasons: tuple
    checks: tuple
    profile: dict

    def to_dict(self) -> dict:
        return {"auto_qualified_for_review": self.auto_qualified, "reasons": list(self.reasons),
                "checks": [dict(c) for c in self.checks], "profile": dict(self.profile)}


def qualify(comparison: dict, profile, *, registration_metrics: dict | None = None,
            registration_kind: str | None = None, own_contours: dict | None = None) -> Qualification:
    """Check a :func:`~ids_engine.adapt.compare_doses` result against a tolerance profile.

    Each structure's metric deltas are checked against the limits of its kind (or its name);
    each gamma criterion's pass rate against the profile's minimum; a structure of the
    approved plan missing on the new anatomy, a gamma with no evaluated point and (for a
    fiducial registration) a marker residual above the profile's limit each fail.

    ``own_contours``: a second comparison (no gamma) on the new CT's own contours, when it
    has some (drawn on it, or a test case's true ones): its structure checks are made too,
    named "own contours: ...", so contours transferred wrongly (a bad registration) cannot
    qualify a plan by agreeing with themselves.
    """
    rx = float(comparison["prescription_gy"])
    checks, reasons = [], []

    def add(item: str, value, limit, unit: str, passed: bool, reason: str) -> None:
        checks.append({"item": item, "value": value, "limit": limit, "unit": unit, "passed": bool(passed)})
        if not passed:
            reasons.append(reason)

    def structure_checks(comp: dict, prefix: str) -> None:
        for name in comp.get("missing", []):
            add(f"{prefix}{name} present", None, None, "", False,
                f"{prefix}{name}: the approved structure is missing or empty on the new anatomy")
        for name, entry in comp["structures"].items():
            for metric, limit in profile.limits_for(name, entry["kind"]).items():
                unit = {"gy": "Gy", "pct_rx": "% of Rx", "pct": "% of volume"}[limit.unit]
                row = entry["metrics"].get(metric)
                if row is None:
                    add(f"{prefix}{name} {metric}", None, limit.value, unit, False,
                        f"{prefix}{name}: {metric} has a limit in the profile but was not compared")
                    continue
                d = limit.delta_in_unit(row["delta"], rx)
                add(f"{prefix}{name} {metric}", d, limit.value, unit, abs(d) <= limit.value + 1e-9,
                    f"{prefix}{name} {metric}: {row['approved']:.2f} -> {row['new']:.2f} {row['unit']}, delta "
                    f"{d:+.2f} {unit} exceeds {limit.value:g} {unit}")

    structure_checks(comparison, "")
    if own_contours is not None:
        structure_checks(own_contours, "own contours: ")
    # A limit on a structure the comparison does not have (a misspelt name, another case's
    # profile) would otherwise check nothing: it fails, naming the structure.
    compared = set(comparison["structures"]) | set(comparison.get("missing", []))
    for name in sorted(set(profile.structure_limits) - compared):
        add(f"{name} limits", None, None, "", False,
            f"{name}: the tolerance profile has limits for it, but the plan has no structure of that name "
            f"(structures: {', '.join(sorted(compared))})")
    for crit, minimum in profile.gamma_min_pass_pct.items():
        g = comparison.get("gamma", {}).get(crit)
        rate = None if g is None else g["pass_rate_pct"]
        if rate is None or not math.isfinite(rate):
            add(f"gamma {crit}", None, minimum, "%", False, f"gamma {crit}: not evaluated (no reference point)")
            continue
        add(f"gamma {crit}", rate, minimum, "%", rate >= minimum - 1e-9,
            f"gamma {crit}: pass rate {rate:.1f} % below the minimum {minimum:g} %")
    if profile.max_fiducial_rms_mm is not None and registration_kind == "fiducial":
        rms = (registration_metrics or {}).get("rms_residual_mm")
        if rms is None or not math.isfinite(float(rms)):
            add("fiducial residual (RMS)", None, profile.max_fiducial_rms_mm, "mm", False,
                "fiducial registration: no marker residual to check")
        else:
            add("fiducial residual (RMS)", float(rms), profile.max_fiducial_rms_mm, "mm",
                float(rms) <= profile.max_fiducial_rms_mm,
                f"fiducial registration: RMS marker residual {float(rms):.2f} mm exceeds {profile.max_fiducial_rms_mm:g} mm")
    if not checks:
        add("any check", None, None, "", False, "the tolerance profile checked nothing (no limit applies to this plan)")
    return Qualification(not reasons, tuple(reasons), tuple(checks),
                         {"name": profile.name, "source": profile.source})
