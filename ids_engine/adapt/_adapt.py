"""Adaptive replanning (claims 1-11 of seed 003): the approved plan carried onto a new CT.

Steps (:func:`adapt_plan`, given the registration and the new anatomy with the approved
contours transferred onto it):

1. **Recompute** the approved plan on the new anatomy: the same beams, their isocentres
   mapped through the registration's rigid part (``R @ iso + t``), the same fluence (moved
   onto the new engine's fluence grids; the grids share nodes, so this is a copy).
2. **Quantify** it against the approved plan (:func:`compare_doses`) and **qualify** it
   against the tolerance profile.
3. **Adapt** (always, or with ``reoptimise="auto"`` only when the recomputed plan does not
   qualify): warm-started re-optimisation for the approved goals
   (``optimise_plan(..., initial_fluences=approved fluence)``; without a protocol, goals are
   derived from the approved dose on the approved structures, and the result says so), then
   the approved plan's shaping requests are replayed with their voxel positions mapped
   through the registration (:func:`map_requests`); requests that fall outside the new grid
   or body, or that the new plan refuses, are skipped and reported.
4. Quantify and qualify the adapted plan.

The adapted plan is a :class:`~ids_engine.session.Session` on the new anatomy: its starting
plan is the re-optimised (or recomputed) fluence and its journal holds the replayed
requests, so it can be saved, reopened and shaped further like any session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from ._approved import AdaptError, ApprovedPlan
from ._compare import compare_doses, structure_metrics
from ._qualify import Qualification, qualify
from ._replay import MappedRequest, map_requests
from ._tolerance import ToleranceProfile, default_tolerance

__all__ = ["AdaptOptions", "AdaptResult", "adapt_plan", "beam_angles_following", "derived_goals", "fluence_on_grid",
           "mapped_beams"]

REOPTIMISE = ("auto", "always", "never")


@dataclass(frozen=True)
class AdaptOptions:
    """Settings of :func:`adapt_plan`.

    reoptimise : "auto" (re-optimise only when the recomputed approved plan is not within
        tolerance), "always" or "never" (the adapted plan is the recomputed one).
    max_iterations, tail_rounds, beamlet_cells : passed to
        :func:`~ids_engine.planning.optimise_plan` (warm-started: fewer iterations than a
        plan from scratch suffice).
    replay : replay the approved plan's shaping requests after re-optimising.
    rotate_beams : turn the beams with the registration's rotation (gantry, couch and
        collimator angles changed as a 6-degree-of-freedom couch correction would), so the
        approved fluence meets the rotated anatomy as planned; default: only the
        isocentres move and the beam angles stay.
    gamma_max_points : gamma evaluated on at most this many reference points (seeded
        subset; None: every point above the low-dose threshold).
    """

    reoptimise: str = "auto"
    max_iterations: int = 200
    tail_rounds: int = 1
    beamlet_cells: int | None = None
    replay: bool = True
    gamma_max_points: int | None = 30000
    rotate_beams: bool = False

    def __post_init__(self) -> None:
        if self.reoptimise not in REOPTIMISE:
            raise ValueError(f"AdaptOptions.reoptimise must be one of {', '.join(REOPTIMISE)}, got {self.reoptimise!r}")
        if int(self.max_iterations) < 1 or int(self.tail_rounds) < 0:
            raise ValueError("AdaptOptions.max_iterations must be >= 1 and tail_rounds >= 0")
        if self.gamma_max_points is not None and int(self.gamma_max_points) < 1:
            raise ValueError(f"AdaptOptions.gamma_max_points must be >= 1 or None, got {self.gamma_max_points!r}")


@dataclass(eq=False)
class AdaptResult:
    """What :func:`adapt_plan` produced.

    session : the adapted plan (a Session on the new anatomy; not yet saved).
    approved_dose_gy : the approved dose on the planning grid.
    approved_warped_gy : the approved dose warped onto the new grid (the gamma reference).
    recomputed_dose_gy : the approved plan recomputed on the new anatomy.
    adapted_dose_gy : the adapted plan's dose (the recomputed one when not re-optimised).
    comparison_recomputed, comparison_adapted : :func:`compare_doses` results.
    qualification_recomputed, qualification_adapted : :func:`qualify` results.
    reoptimised : whether the plan was re-optimised; why : the reason in words.
    goals_source : "protocol <name>" or "derived from the approved dose".
    goals : the goals re-optimised for (labels).
    replay : the mapped requests and what became of them (list of dicts).
    optimiser : iterations, objective, unmet constraints (None when not re-optimised).
    notes : plain-language remarks for the report.
    timings_s : per step.
    own_contours : {"recomputed", "adapted"} comparisons on the new CT's own contours (None
        when it has none).
    """

    session: object
    approved_dose_gy: np.ndarray
    approved_warped_gy: np.ndarray
    recomputed_dose_gy: np.ndarray
    adapted_dose_gy: np.ndarray
    comparison_recomputed: dict
    comparison_adapted: dict
    qualification_recomputed: Qualification
    qualification_adapted: Qualification
    reoptimised: bool
    why: str
    goals_source: str
    goals: list
    replay: list
    optimiser: dict | None
    notes: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    own_contours: dict | None = None


def fluence_on_grid(fluence: np.ndarray, old_grid, new_grid) -> np.ndarray:
    """A fluence map moved from one fluence grid to another (BEV coordinates, isocentre plane).

    Grids with the same pitch whose origins differ by whole cells (the engine's automatic
    grids: the beam axis on a node) give an exact copy of the overlap; otherwise bilinear
    interpolation. Cells of the new grid outside the old one get zero fluence.
    """
    f = np.asarray(fluence, dtype=np.float32)
    if f.shape != old_grid.shape_vu:
        raise ValueError(f"fluence_on_grid: map shape {f.shape} != old grid {old_grid.shape_vu}")
    out = np.zeros(new_grid.shape_vu, np.float32)
    dc = (new_grid.origin_mm_uv[0] - old_grid.origin_mm_uv[0]) / old_grid.pitch_mm
    dr = (new_grid.origin_mm_uv[1] - old_grid.origin_mm_uv[1]) / old_grid.pitch_mm
    if abs(new_grid.pitch_mm - old_grid.pitch_mm) < 1e-9 and abs(dc - round(dc)) < 1e-6 and abs(dr - round(dr)) < 1e-6:
        dr, dc = int(round(dr)), int(round(dc))
        nv, nu = new_grid.shape_vu
        ov, ou = old_grid.shape_vu
        r0, r1 = max(0, -dr), min(nv, ov - dr)
        c0, c1 = max(0, -dc), min(nu, ou - dc)
        if r1 > r0 and c1 > c0:
            out[r0:r1, c0:c1] = f[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        return out
    rows, cols = old_grid.to_index(*np.meshgrid(new_grid.u_mm(), new_grid.v_mm()))
    return ndimage.map_coordinates(f, [rows, cols], order=1, mode="constant", cval=0.0).astype(np.float32)


def beam_angles_following(beam, rotation, patient_position: str = "HFS") -> tuple[float, float, float]:
    """(gantry, couch, collimator) degrees of ``beam`` turned with the patient by ``rotation``
    (3x3, patient frame): the beam-limiting-device frame ``M`` becomes ``M @ R.T``, so every
    point of the anatomy keeps its beam's-eye-view position (what a 6-degree-of-freedom
    couch correction achieves). Solved by least squares from the beam's own angles, so the
    nearest solution is taken (gantry 0 and 180 are gimbal points of the IEC chain)."""
    from scipy.optimize import least_squares

    from ids_engine.model._beam import rotation_matrix_patient_to_beam

    target = beam.rotation(patient_position) @ np.asarray(rotation, np.float64).T
    start = np.array([beam.gantry_deg, beam.couch_deg, beam.collimator_deg], np.float64)

    def residual(a):
        return (rotation_matrix_patient_to_beam(a[0], a[1], a[2], patient_position) - target).ravel()

    def damped(a):  # at a gimbal point the couch and collimator trade off: change them least
        return np.concatenate([residual(a), 1e-3 * (a[1:] - start[1:])])

    sol = least_squares(damped, start, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    sol = least_squares(residual, sol.x, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    if np.abs(residual(sol.x)).max() > 1e-6:  # pragma: no cover - the IEC chain reaches every rotation
        raise AdaptError(f"beam {beam.name!r}: no gantry, couch and collimator angles follow the rotation")
    return tuple(float(v) % 360.0 for v in sol.x)


def mapped_beams(beams, registration, *, rotate_beams: bool = False, patient_position: str = "HFS") -> list:
    """The beams with their isocentres mapped through the registration's rigid part
    (``R @ iso + t``, patient mm); fluence grid left to the new engine. Angles are kept,
    or with ``rotate_beams`` turned with the patient (:func:`beam_angles_following`)."""
    R = np.asarray(registration.rotation, np.float64)
    t = np.asarray(registration.translation_mm_xyz, np.float64)
    out = []
    for b in beams:
        iso = R @ np.asarray(b.isocentre_mm_xyz, np.float64) + t
        nb = replace(b, isocentre_mm_xyz=tuple(float(v) for v in iso), fluence_grid=None)
        if rotate_beams and not np.allclose(R, np.eye(3), atol=1e-12):
            g, c, col = beam_angles_following(b, R, patient_position)
            nb = replace(nb, gantry_deg=g, couch_deg=c, collimator_deg=col)
        out.append(nb)
    return out


def derived_goals(approved: ApprovedPlan) -> list:
    """Goals that ask for the approved plan's dose again, from its dose on its structures:
    targets D95 >= approved D95 (importance 100), min dose >= approved D98 (30) and max dose
    <= approved D2 (30); OARs mean <= approved mean (10) and D2 <= approved D2 (5)."""
    from ids_engine.optimise import MaxDose, MaxDVH, MaxMeanDose, MinDose, MinDVH

    m = structure_metrics(approved.dose_gy, approved.patient, approved.prescription_gy)
    goals = []
    for s in approved.patient.targets:
        if s.name in m:
            v = m[s.name]
            goals += [MinDVH(s.name, v["D95"], 95.0, importance=100.0), MinDose(s.name, v["D98"], importance=30.0),
                      MaxDose(s.name, v["D2"], importance=30.0)]
    for s in approved.patient.oars:
        if s.name in m:
            v = m[s.name]
            goals += [MaxMeanDose(s.name, v["mean"], importance=10.0), MaxDVH(s.name, v["D2"], 2.0, importance=5.0)]
    if not goals:
        raise AdaptError(f"{approved.path}: no protocol and no target or OAR to derive goals from")
    return goals


def adapt_plan(approved: ApprovedPlan, new_patient, registration, *, case: dict, tolerance: ToleranceProfile | None = None,
               options: AdaptOptions | None = None, own_contours=None, progress=None, cancel=None) -> AdaptResult:
    """Carry the approved plan onto the new anatomy (steps in the module docstring).

    Parameters
    ----------
    approved : the approved plan (:func:`load_approved_plan`).
    new_patient : the new CT with the approved structures transferred onto it (same names).
    registration : planning -> new (:mod:`ids_engine.registration`), grids those of
        ``approved.patient`` and ``new_patient``.
    case : the new patient's case description (the adapted session is saved with it; see
        :func:`ids_engine.session.case_from_spec`).
    tolerance : the tolerance profile (default: :func:`default_tolerance`).
    options : :class:`AdaptOptions`.
    own_contours : the new CT with its own structures (drawn on it, or a test case's true
        ones) on ``new_patient``'s grid, or None: the plans are also compared on them, and
        the qualification checks them too (see :func:`qualify`).
    progress, cancel : ``progress(done, total, label)``; ``cancel()`` stops the optimiser.
    """
    from ids_engine.dmr import RequestError
    from ids_engine.planning import optimise_plan
    from ids_engine.session import Session

    tolerance = tolerance or default_tolerance()
    options = options or AdaptOptions()
    t = {}
    notes = []
    rx = approved.prescription_gy
    if tuple(registration.new_grid.shape_zyx) != tuple(new_patient.grid.shape_zyx):
        raise AdaptError(f"the registration's new grid {registration.new_grid.describe()} is not the new CT's "
                         f"{new_patient.grid.describe()}")

    t0 = time.perf_counter()
    beams = mapped_beams(approved.beams, registration, rotate_beams=options.rotate_beams,
                         patient_position=new_patient.patient_position)
    if options.rotate_beams:
        turned = [f"{b.name}: gantry {b.gantry_deg:.1f}, couch {b.couch_deg:.1f}, collimator {b.collimator_deg:.1f}"
                  for a, b in zip(approved.beams, beams)
                  if (a.gantry_deg, a.couch_deg, a.collimator_deg) != (b.gantry_deg, b.couch_deg, b.collimator_deg)]
        if turned:
            notes.append("beams turned with the patient's rotation (" + "; ".join(turned) + " deg)")
    session = Session(new_patient, beams, prescription_gy=rx, engine_options=approved.engine_options,
                      dmr_options=approved.dmr_options, case=case, progress=progress)
    maps = [fluence_on_grid(f, b.fluence_grid, g.fluence_grid)
            for f, b, g in zip(approved.fluences, approved.beams, session.engine.geometry)]
    lost = [100.0 * (1.0 - float(m.sum()) / float(f.sum())) for f, m in zip(approved.fluences, maps) if f.sum() > 0]
    if lost and max(lost) > 0.01:
        notes.append(f"the new CT's fluence grids miss up to {max(lost):.2f} % of a beam's approved fluence "
                     "(the body's projection shrank)")
    session.set_plan(maps)
    recomputed = session.dose()
    t["recompute"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    warped = np.asarray(registration.warp_to_new(np.asarray(approved.dose_gy, np.float64), order=1, fill=0.0))
    compare = dict(prescription_gy=rx, approved_warped_gy=warped, low_dose_threshold_pct=tolerance.low_dose_threshold_pct,
                   gamma_max_points=options.gamma_max_points, progress=progress)
    reg_metrics = dict(getattr(registration, "metrics", {}) or {})

    def own(dose):
        if own_contours is None:
            return None
        comp = compare_doses(approved.dose_gy, approved.patient, dose, own_contours, registration, prescription_gy=rx,
                             gamma=False)
        # The new CT's own contours may cover only some structures (a re-drawn target): the
        # others are checked on the transferred contours, not failed as missing.
        return {**comp, "missing": [], "not_contoured": list(comp.get("missing", []))}

    comp_re = compare_doses(approved.dose_gy, approved.patient, recomputed, new_patient, registration, **compare)
    own_re = own(recomputed)
    qual_re = qualify(comp_re, tolerance, registration_metrics=reg_metrics, registration_kind=registration.kind,
                      own_contours=own_re)
    t["compare_recomputed"] = time.perf_counter() - t0

    if options.reoptimise == "never":
        reopt, why = False, "re-optimisation switched off (reoptimise='never'): the adapted plan is the recomputed one"
    elif options.reoptimise == "always":
        reopt, why = True, "re-optimisation asked for (reoptimise='always')"
    elif qual_re.auto_qualified:
        reopt, why = False, ("the approved plan recomputed on the new anatomy is within tolerance: it is kept "
                             "unchanged (no re-optimisation needed)")
    else:
        reopt, why = True, (f"the approved plan recomputed on the new anatomy is out of tolerance "
                            f"({len(qual_re.reasons)} check(s) failed): re-optimised")

    goals_source, goal_labels, replay, optimiser = "", [], [], None
    if reopt:
        t0 = time.perf_counter()
        if approved.protocol is not None:
            goals = list(approved.protocol.goals)
            goals_source = f"protocol {approved.protocol.name or approved.protocol_path}"
        else:
            goals = derived_goals(approved)
            goals_source = "derived from the approved dose on the approved structures (the plan keeps no protocol)"
            notes.append("no protocol with the approved plan: the re-optimisation goals were derived from the "
                         "approved dose (targets' D95, D98, D2; OARs' mean and D2)")
        empty = sorted({g.structure for g in goals if new_patient.structure(g.structure).is_empty})
        if empty:
            raise AdaptError(f"the transferred structure(s) {', '.join(empty)} are empty on the new CT: "
                             "the approved goals cannot be re-optimised (check the registration)")
        goal_labels = [g.label for g in goals]
        plan = optimise_plan(session.engine, goals, initial_fluences=maps, max_iterations=int(options.max_iterations),
                             tail_rounds=int(options.tail_rounds), beamlet_cells=options.beamlet_cells,
                             progress=progress, cancel=cancel)
        session.set_plan(plan.fluences)
        res = plan.result
        optimiser = {"iterations": plan.iterations, "objective": res.objective, "message": res.message,
                     "unmet_constraints": [str(u) for u in res.unmet_constraints],
                     "tail_error_pct_of_max": plan.tail_error_pct,
                     "timings_s": {k: round(v, 3) for k, v in plan.timings_s.items()}}
        t["reoptimise"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if options.replay and approved.requests:
            mapped = map_requests(approved.requests, registration, session.engine.body_mask)
            for n, m in enumerate(mapped):
                if progress is not None:
                    progress(n, len(mapped), "replaying requests")
                entry = {"n": n + 1, **m.to_dict()}
                if m.mapped is not None:
                    try:
                        r = session.run(m.mapped)
                        entry.update(replayed=True, final_gy=float(np.mean(r.final_gy)) if r.final_gy.size else None,
                                     conflicts=sum(1 for c in r.conflicts if c.kind != "rise"),
                                     side_effects=sum(1 for c in r.conflicts if c.kind == "rise"))
                    except RequestError as exc:
                        why = ("not needed: the adapted plan already meets it" if "already" in str(exc)
                               else "skipped: the adapted plan refused it")
                        entry.update(replayed=False, skipped=True, note=f"{why} ({exc})")
                else:
                    entry["replayed"] = False
                replay.append(entry)
            if progress is not None:
                progress(len(mapped), len(mapped), "replaying requests")
        elif approved.requests:
            replay = [{"n": n + 1, **MappedRequest(r, None, "skipped: replay switched off").to_dict(), "replayed": False}
                      for n, r in enumerate(approved.requests)]
        t["replay"] = time.perf_counter() - t0
    elif approved.requests:
        notes.append(f"the approved plan's {len(approved.requests)} shaping request(s) are part of its fluence and "
                     "carried over with it (not replayed)")
    adapted = session.dose()

    t0 = time.perf_counter()
    if reopt:
        comp_ad = compare_doses(approved.dose_gy, approved.patient, adapted, new_patient, registration, **compare)
        own_ad = own(adapted)
        qual_ad = qualify(comp_ad, tolerance, registration_metrics=reg_metrics, registration_kind=registration.kind,
                          own_contours=own_ad)
    else:
        comp_ad, qual_ad, own_ad = comp_re, qual_re, own_re
    t["compare_adapted"] = time.perf_counter() - t0
    return AdaptResult(session, np.asarray(approved.dose_gy), warped, recomputed, adapted, comp_re, comp_ad, qual_re,
                       qual_ad, reopt, why, goals_source, goal_labels, replay, optimiser, notes, t,
                       {"recomputed": own_re, "adapted": own_ad} if own_contours is not None else None)
