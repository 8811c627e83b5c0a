"""Quantify the difference between a plan on the new anatomy and the approved plan (claim 8).

Two views, both reported:

* **DVH metric deltas per structure**: each structure's metrics of the new dose on the new
  anatomy (the transferred contours) minus the approved dose's on the planning anatomy
  (targets: D98, D95, D50, D2, mean, V95; OARs: mean, D2, max). This asks "does the patient
  get the plan that was approved?" regardless of where the anatomy moved.
* **Gamma** (Low et al. 1998; :func:`ids_engine.evaluation.gamma_index`), global, with a
  low-dose threshold: the approved dose warped onto the new CT through the registration is
  the reference, the new dose is evaluated, at 3 %/3 mm and 2 %/2 mm.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DVH_METRICS", "compare_doses", "structure_metrics"]

# What each structure kind is compared on (names as in the tolerance profile).
DVH_METRICS = {"target": ("D98", "D95", "D50", "D2", "mean", "V95"),
               "oar": ("mean", "D2", "max"),
               "external": ("mean", "max"),
               "other": ("mean", "max")}
_KEY = {"D98": "D98_gy", "D95": "D95_gy", "D50": "D50_gy", "D2": "D2_gy", "mean": "mean_gy", "max": "max_gy",
        "min": "min_gy", "V95": "V95_pct", "V107": "V107_pct"}
GAMMA_CAP = 1.2
GAMMA_CRITERIA = (("3%/3mm", 3.0, 3.0), ("2%/2mm", 2.0, 2.0))


def structure_metrics(dose_gy, patient, prescription_gy: float) -> dict:
    """name -> {metric: value} (Gy, V in % of the volume) of every non-empty structure."""
    from ids_engine.evaluation import dvh_metrics

    d = np.asarray(dose_gy, dtype=np.float64)
    out = {}
    for s in patient.structures:
        if s.is_empty:
            continue
        m = dvh_metrics(d, s.mask, prescription_gy)
        out[s.name] = {k: m[v] for k, v in _KEY.items() if v in m}
    return out


def _gamma(reference, evaluated, grid, *, dose_pct, dta_mm, low_pct, max_points, seed=0) -> dict:
    from ids_engine.evaluation import gamma_index, gamma_summary, grid_axes_mm

    axes = grid_axes_mm(grid)
    # Only the pass rate is judged: the search stops at GAMMA_CAP x DTA (gamma above the cap
    # reads as the cap, still a failure), which keeps failing points from searching far.
    g = gamma_index(axes, reference, axes, evaluated, dose_percent=dose_pct, dta_mm=dta_mm,
                    cutoff_percent=low_pct, max_gamma=GAMMA_CAP, max_points=max_points, seed=seed)
    s = gamma_summary(g)
    return {"pass_rate_pct": s["pass_rate_pct"], "mean": s["mean"], "p95": s["p95"], "points": s["points"],
            "dose_pct": dose_pct, "dta_mm": dta_mm, "low_dose_threshold_pct": low_pct,
            "normalisation": "global (maximum of the warped approved dose)", "gamma_capped_at": GAMMA_CAP}


def compare_doses(approved_dose_gy, approved_patient, new_dose_gy, new_patient, registration, *,
                  prescription_gy: float, approved_warped_gy=None, low_dose_threshold_pct: float = 10.0,
                  gamma_max_points: int | None = 30000, gamma: bool = True, progress=None) -> dict:
    """The difference between ``new_dose_gy`` (on ``new_patient``) and the approved plan.

    Parameters
    ----------
    approved_dose_gy : float (z, y, x) Gy on the planning grid.
    approved_patient : the planning anatomy (its structures are the approved contours).
    new_dose_gy : float (z, y, x) Gy on the new grid.
    new_patient : the new anatomy with the transferred structures (same names).
    registration : planning -> new (``warp_to_new``).
    prescription_gy : the prescription (deltas also in % of it).
    approved_warped_gy : the approved dose already warped onto the new grid (computed when None).
    low_dose_threshold_pct : gamma's low-dose cutoff, % of the reference maximum.
    gamma_max_points : evaluate gamma on at most this many reference points (a seeded random
        subset; None: all). The number used is reported.
    gamma : False leaves the gamma out (``gamma`` is then {}).

    Returns
    -------
    dict (JSON-ready): ``structures`` {name: {kind, metrics: {metric: {approved, new, delta,
    delta_pct_rx, unit}}}}, ``missing`` (approved structures the new anatomy lacks or that
    are empty there), ``gamma`` {criterion: summary}.
    """
    rx = float(prescription_gy)
    before = structure_metrics(approved_dose_gy, approved_patient, rx)
    after = structure_metrics(new_dose_gy, new_patient, rx)
    structures, missing = {}, []
    for s in approved_patient.structures:
        if s.name not in before:
            continue
        if s.name not in after:
            missing.append(s.name)
            continue
        kind = s.kind.value if s.kind.value in DVH_METRICS else "other"
        rows = {}
        # Every metric is kept (a profile may limit any); reports show the kind's list.
        for metric in before[s.name]:
            a, b = before[s.name][metric], after[s.name][metric]
            delta = b - a
            unit = "%" if metric.startswith("V") else "Gy"
            rows[metric] = {"approved": a, "new": b, "delta": delta, "unit": unit,
                            "delta_pct_rx": None if unit == "%" else 100.0 * delta / rx,
                            "reported": metric in DVH_METRICS[kind]}
        structures[s.name] = {"kind": s.kind.value, "metrics": rows}
    if not gamma:
        return {"prescription_gy": rx, "structures": structures, "missing": missing, "gamma": {}}
    if approved_warped_gy is None:
        approved_warped_gy = registration.warp_to_new(np.asarray(approved_dose_gy, np.float64), order=1, fill=0.0)
    gamma = {}
    for k, (name, dd, dta) in enumerate(GAMMA_CRITERIA):
        if progress is not None:
            progress(k, len(GAMMA_CRITERIA), f"gamma {name}")
        gamma[name] = _gamma(np.asarray(approved_warped_gy, np.float64), np.asarray(new_dose_gy, np.float64),
                             new_patient.grid, dose_pct=dd, dta_mm=dta, low_pct=low_dose_threshold_pct,
                             max_points=gamma_max_points)
    if progress is not None:
        progress(len(GAMMA_CRITERIA), len(GAMMA_CRITERIA), "gamma")
    return {"prescription_gy": rx, "structures": structures, "missing": missing, "gamma": gamma}
