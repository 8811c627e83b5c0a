"""Shaping quality benchmark: does dose shaping do what the planner asked?

Clinical horseshoe, 9 equispaced open fields normalised to a PTV median of 60 Gy, shipped
defaults. Every goal of the shaping-quality issue is measured and reported with its figure:

1. **paper**: the IDS paper's experiment (OAR rim voxel m to 55 %, 25 recovery steps): every
   target voxel >= 95 % and m within 1 % of 55 %; the state kept is the best one reached.
2. **survey**: >= 300 joint requests (2D line drags at 12 angles, both directions, three levels,
   on three slices; 3D surface drags; hot and cold erases), from the open-field plan and from an
   already-shaped plan. No request voxel more than 3 % of Rx beyond its requested value; no
   voxel farther than 10 mm from the request's region rises more than 5 % of Rx (nearer voxels
   are the request's own dose fall-off). Reported three ways: anywhere; beyond what a rigid
   move of the plan by the drag vector asks within 20 mm of the request (on a line drag's own
   slice; a dragged line takes
   its fall-off with it: ``D_before(v - drag) - D_before(v)``, the same "asked" value the
   overshoot uses); and outside the beams' paths through the request (raising the dose
   somewhere raises it along the rays through it). The paper's experiment (goal 1) is
   measured the same way, for reference.
   A drag's "requested value" of a swept voxel is the dose the plan would have there if it
   moved rigidly with the drag.
3. **landing**: the dragged level ends within 1 mm (median) / 2 mm (worst) of the drag end; 10 mm
   beside the drag it moves less than 1 mm.
4. **pins**: a pinned ball next to a series of requests stays within the recovery tolerance, or
   the request reports a conflict naming the pin; never silently broken.
5. **erase**: after erasing to [lo, hi], no region voxel above hi + 1 % of Rx and the number of
   target voxels above hi does not rise.
6. **session**: ten OAR-rim requests to 55 % in a row: target V95 >= 99 %, min >= 93 %,
   max <= 110 %, OAR mean <= 48.2 Gy (the figure measured before this work).
7. **speed**: the whole request (modify + 25 steps) within about 1.2 s on 2 CPU cores.

Usage: ``python bench/bench_shaping.py [--resolution clinical] [--quick]`` (``--quick``: every
fourth survey request, for development). Writes ``bench/results/shaping-horseshoe-<backend>-<device>.json``
and a PNG beside it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, device_slug, print_table, write_result  # noqa: E402

from ids_engine import backend  # noqa: E402
from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, Pin, RequestError, SetVoxelDose  # noqa: E402
from ids_engine.evaluation import beside_shift_mm, drag_landing_mm, dvh_metrics  # noqa: E402
from ids_engine.dmr._side_effects import SHIFT_REACH_MM, rigid_shift_rise  # noqa: E402
from ids_engine.session import Session  # noqa: E402

RX = 60.0
LEVELS_PCT = (50.0, 80.0, 95.0)
ANGLES_DEG = tuple(range(0, 360, 30))
DRAG_MM = 5.0


def stats(values) -> dict:
    t = np.asarray(values, float)
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "n": int(t.size)}


def oar_rim_voxel(s: Session, dz_mm: float = 0.0, angle_deg: float = 0.0) -> tuple[int, int, int]:
    """The OAR's boundary voxel on the ray from its centre, ``angle_deg`` from anterior (-y)
    towards +x, on the slice ``dz_mm`` from the centre (the paper's m: 0, 0)."""
    oar = s.patient.structure("OAR").mask
    sp = np.asarray(s.patient.grid.spacing_mm_zyx, float)
    c = np.argwhere(oar).mean(axis=0)
    k = int(round(c[0] + dz_mm / sp[0]))
    a = math.radians(angle_deg)
    d = np.array([-math.cos(a), math.sin(a)])  # (y, x), unit in mm
    last = None
    for r in np.arange(0.0, 60.0, 0.25):
        j = int(round(c[1] + r * d[0] / sp[1]))
        i = int(round(c[2] + r * d[1] / sp[2]))
        if oar[k, j, i]:
            last = (k, j, i)
        elif last is not None:
            break
    return last


def _crossings_on_ray(dose_slice, sp_yx, c_yx, angle_deg, level, r_max=90.0, step=0.25):
    """Points (y, x voxel units) where the level is crossed along a ray on a slice."""
    a = math.radians(angle_deg)
    d = np.array([-math.cos(a), math.sin(a)])
    r = np.arange(0.0, r_max, step)
    pts = c_yx[:, None] + (d / sp_yx)[:, None] * r[None, :]
    ok = np.all((pts >= 0) & (pts <= np.asarray(dose_slice.shape)[:, None] - 1), axis=0)
    v = ndimage.map_coordinates(dose_slice.astype(np.float64), pts, order=1, mode="nearest") - level
    out = []
    for n in np.flatnonzero((np.sign(v[:-1]) != np.sign(v[1:])) & ok[:-1] & ok[1:]):
        frac = v[n] / (v[n] - v[n + 1])
        out.append((c_yx + (d / sp_yx) * (r[n] + frac * step), d))
    return out


def survey_requests(s: Session, dose: np.ndarray, quick: bool) -> list:
    """Line drags (3 slices x 12 angles x 3 levels x crossings x 2 directions), surface drags
    (95 %, 12 angles x 2 directions) and erases, generated on the given dose."""
    g = s.patient.grid
    sp = np.asarray(g.spacing_mm_zyx, float)
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0)
    out = []
    for dz in (-12.0, 0.0, 12.0):
        k = int(round(c[0] + dz / sp[0]))
        for lvl in LEVELS_PCT:
            level = lvl / 100.0 * RX
            for ang in ANGLES_DEG:
                for p, d in _crossings_on_ray(dose[k], sp[1:], c[1:], ang, level):
                    for sign in (1.0, -1.0):
                        end = p + sign * d * DRAG_MM / sp[1:]
                        out.append(("line", MoveIsodoseLine("z", k, level, tuple(p), tuple(end))))
    k = int(round(c[0]))
    for ang in ANGLES_DEG:
        crossings = _crossings_on_ray(dose[k], sp[1:], c[1:], ang, 0.95 * RX)
        for p, d in crossings[-1:]:  # the outer edge of the target
            for sign in (1.0, -1.0):
                end = p + sign * d * DRAG_MM / sp[1:]
                out.append(("surface", MoveIsodoseSurface(0.95 * RX, (float(k), *p), (float(k), *end), radius_mm=4.0)))
    ptv = s.patient.structure("PTV").mask
    hot = np.argwhere(ptv & (dose >= np.percentile(dose[ptv], 99.5)))
    cold = np.argwhere(ptv & (dose <= np.percentile(dose[ptv], 0.5)))
    for pts, lo, hi in ((hot, 0.95 * RX, 1.03 * RX), (cold, 0.97 * RX, 1.07 * RX)):
        for p in pts[:: max(1, len(pts) // 6)][:6]:
            out.append(("erase", EraseSpot(tuple(float(v) for v in p), 6.0, lo, hi, structure="PTV")))
    if quick:
        out = out[::4]
    return out


def _feature_mask(s: Session, res) -> np.ndarray:
    m = np.zeros(s.patient.grid.shape_zyx, bool)
    m.flat[res.feature_voxels] = True
    return m


def _beam_paths(s: Session, flat: np.ndarray) -> np.ndarray:
    """Body voxels on the rays through the given voxels in any beam (their BEV box per beam,
    widened by the reach of the patch kernel), bool (z, y, x)."""
    eng = s.engine
    out = np.zeros(eng.grid.size, bool)
    reach = s.modifier.kernel_radius_mm / eng.geometry[0].fluence_grid.pitch_mm + 2.0
    for geo in eng.geometry:
        lvl = geo.fine.host
        pos = lvl.position[flat]
        u, v = lvl.u_cells[pos], lvl.v_cells[pos]
        au, av = lvl.u_cells, lvl.v_cells
        inside = (au >= u.min() - reach) & (au <= u.max() + reach) & (av >= v.min() - reach) & (av <= v.max() + reach)
        out[lvl.vox[inside]] = True
    return out.reshape(eng.grid.shape_zyx)



def _rigid_shift_rise(before: np.ndarray, dist: np.ndarray, a3, b3, slice_index: int | None = None) -> np.ndarray:
    """The rise a rigid move of the plan by the drag vector ``b3 - a3`` (voxels, z y x) asks
    for, ``max(D_before(v - drag) - D_before(v), 0)``, within SHIFT_REACH_MM of the request
    (zero elsewhere); for a line drag only on its own slice ``slice_index`` (it asks nothing of
    the others). The engine's side-effect check uses the same function."""
    out = np.zeros(before.shape, np.float32)
    near = dist <= SHIFT_REACH_MM
    if slice_index is not None:
        near[: int(slice_index)] = False
        near[int(slice_index) + 1:] = False
    flat = np.flatnonzero(near.ravel())
    if flat.size:
        b64 = before.astype(np.float64).ravel()
        out.ravel()[flat] = rigid_shift_rise(lambda f: b64[f], before.shape, flat, a3, b3)
    return out


def measure_request(s: Session, kind: str, req, before: np.ndarray) -> dict:
    """Run one survey request, measure it, undo it."""
    t0 = time.perf_counter()
    try:
        res = s.run(req)
    except RequestError as exc:
        return {"kind": kind, "refused": str(exc)}
    ms = (time.perf_counter() - t0) * 1000
    after = s.dose()
    sp = s.patient.grid.spacing_mm_zyx
    fv = res.feature_voxels
    b, a = before.ravel()[fv], after.ravel()[fv]
    goal = res.feature_goal
    # Overshoot beyond the requested value, over the feature voxels that were asked to move.
    if kind == "erase":  # asked: into [lo, hi]
        over = np.maximum(np.where(b > req.high_gy, req.low_gy - a, 0), np.where(b < req.low_gy, a - req.high_gy, 0))
    else:
        # A drag asks the isodose to move by the drag vector: the value asked of a swept voxel is
        # the dose the rigidly shifted plan would give it, ``D_before(v - drag)`` (at the drag end:
        # the level). Overshoot is going past that, in the direction of the request.
        if kind == "line":
            a3 = np.array([req.slice_index, *req.start_rc], float)
            b3 = np.array([req.slice_index, *req.end_rc], float)
        else:
            a3, b3 = np.array(req.start_zyx, float), np.array(req.end_zyx, float)
        src = np.stack(np.unravel_index(fv, before.shape), axis=0).astype(float) - (b3 - a3)[:, None]
        asked = ndimage.map_coordinates(before.astype(np.float64), src, order=1, mode="nearest")
        up = np.median(goal) > np.median(b) if goal.size else True
        moved = (b < req.level_gy) if up else (b > req.level_gy)
        asked = np.maximum(asked, goal) if up else np.minimum(asked, goal)
        over = np.where(moved, (a - asked) if up else (asked - a), 0.0)
    over_pct = float(max(0.0, over.max())) / RX * 100
    # Rise outside the request: farther than 10 mm from the feature.
    fm = _feature_mask(s, res)
    dist = ndimage.distance_transform_edt(~fm, sampling=sp)
    body = s.engine.body_mask
    far = body & (dist > 10.0)
    rise = after - before
    rise_far_pct = float(rise[far].max()) / RX * 100
    # Physics: raising the dose anywhere raises it along the rays through that place (entrance
    # and exit). Outside those beam paths (the request's BEV box in each beam, widened by the
    # patch kernel's reach) a rise is a side effect, not what the request asked for.
    off_path = far & ~_beam_paths(s, fv)
    rise_off_path_pct = float(rise[off_path].max()) / RX * 100 if off_path.any() else 0.0
    # A drag asks the dose fall-off next to the dragged level to move with it: within
    # SHIFT_REACH_MM of the request, the rise a rigid move of the plan by the drag vector
    # would give (``D_before(v - drag) - D_before(v)``) is asked for; beyond that, every rise counts.
    rise_beyond_shift_pct = rise_far_pct
    unasked = rise
    if kind in ("line", "surface"):
        asked_up = _rigid_shift_rise(before, dist, a3, b3, req.slice_index if kind == "line" else None)
        unasked = rise - asked_up
        rise_beyond_shift_pct = float(unasked[far].max()) / RX * 100
    # What the engine must report as a side effect (DMROptions.report_rise_pct): the unasked
    # rise far away, in every tissue (the target too, inside its band or not).
    opts = s.options
    reportable = far
    rise_reportable_pct = float(unasked[reportable].max()) / RX * 100 if reportable.any() else 0.0
    side = [c for c in res.conflicts if c.kind == "rise"]
    where_far = np.unravel_index(int(np.argmax(np.where(far, rise, -np.inf))), rise.shape)
    tissue = ("PTV" if s.target_mask[where_far] else "OAR" if s.oar_mask[where_far] else "body")
    rise_any_pct = float(rise[body & ~fm].max()) / RX * 100
    from dataclasses import asdict

    row = {"kind": kind, "request": asdict(req), "ms": ms, "overshoot_pct": over_pct, "rise_far_pct": rise_far_pct, "rise_any_pct": rise_any_pct, "rise_off_path_pct": rise_off_path_pct,
           "rise_beyond_shift_pct": rise_beyond_shift_pct,
           "rise_far_where": [int(v) for v in where_far], "rise_far_tissue": tissue,
           "rise_reportable_pct": rise_reportable_pct,
           "side_effects": [c.message for c in side],
           "side_effect_missed": bool(rise_reportable_pct > opts.report_rise_pct and not side),
           "side_effects_repaired": bool(res.side_effects_repaired),
           "conflicts": [c.message for c in res.conflicts if c.kind != "rise"], "steps": res.recovery_steps,
           "coverage_short_gy": max((c.worst_gy for c in res.conflicts if c.kind == "coverage"), default=0.0),
           "best_step": res.best_step}
    if kind in ("line", "surface"):
        if kind == "line":
            a3 = [req.slice_index, *req.start_rc]
            b3 = [req.slice_index, *req.end_rc]
            plane = 0
        else:
            a3, b3, plane = list(req.start_zyx), list(req.end_zyx), None
        row["landing_mm"] = drag_landing_mm(after, sp, a3, b3, req.level_gy)
        row["beside_mm"] = beside_shift_mm(before, after, sp, a3, b3, req.level_gy, 10.0, plane)
        row["level_pct"] = round(req.level_gy / RX * 100, 1)
    if kind == "erase":
        ptv = s.patient.structure("PTV").mask
        region = np.zeros_like(fm)
        region.flat[fv] = True
        row["region_max_over_hi_pct"] = float((after[region].max() - req.high_gy) / RX * 100)
        row["region_min_under_lo_pct"] = float((req.low_gy - after[region].min()) / RX * 100)
        row["target_above_hi"] = [int((before[ptv] > req.high_gy).sum()), int((after[ptv] > req.high_gy).sum())]
        row["target_below_lo"] = [int((before[ptv] < req.low_gy).sum()), int((after[ptv] < req.low_gy).sum())]
    s.undo()
    s.clear_redo()
    return row


def run_survey(s: Session, quick: bool, label: str) -> list[dict]:
    before = s.dose()
    reqs = survey_requests(s, before, quick)
    rows = []
    t0 = time.perf_counter()
    for n, (kind, req) in enumerate(reqs):
        row = measure_request(s, kind, req, before)
        row["state"] = label
        rows.append(row)
        if (n + 1) % 25 == 0:
            print(f"  survey [{label}] {n + 1}/{len(reqs)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def paper_experiment(s: Session) -> tuple[dict, list[float], np.ndarray, np.ndarray]:
    ptv = s.patient.structure("PTV").mask
    oar = s.patient.structure("OAR").mask
    m = oar_rim_voxel(s)
    before = s.dose()
    times = []
    for rep in range(3):
        t0 = time.perf_counter()
        res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=25)  # the paper's 25 steps
        backend.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
        if rep < 2:
            s.undo()
            s.clear_redo()
    after = s.dose()
    met = dvh_metrics(after, ptv, RX)
    q = {
        "voxel_zyx": list(m), "voxel_after_pct": float(after[m] / RX * 100),
        "voxel_error_pct_of_request": float(abs(after[m] - 0.55 * RX) / (0.55 * RX) * 100),
        "target_min_pct": met["min_gy"] / RX * 100, "target_max_pct": met["max_gy"] / RX * 100, "target_V95_pct": met["V95_pct"],
        "oar_mean_before_gy": float(before[oar].mean()), "oar_mean_after_gy": float(after[oar].mean()),
        "recovery_steps": res.recovery_steps, "best_step": res.best_step,
        "conflicts": [c.message for c in res.conflicts if c.kind != "rise"],
        "side_effects": [c.message for c in res.conflicts if c.kind == "rise"],
    }
    # For reference beside goal 2: how far from m the paper's own request raises the dose.
    fm = np.zeros(before.shape, bool)
    fm.flat[res.feature_voxels] = True
    far = s.engine.body_mask & (ndimage.distance_transform_edt(~fm, sampling=s.patient.grid.spacing_mm_zyx) > 10.0)
    rise = np.where(far, after - before, -np.inf)
    at = np.unravel_index(int(np.argmax(rise)), rise.shape)
    q["rise_far_pct"] = float(rise[at] / RX * 100)
    q["rise_far_where"] = [int(v) for v in at]
    q["rise_far_voxels_over_5pct"] = int((rise > 0.05 * RX).sum())
    q["goal_met"] = bool(q["target_min_pct"] >= 95.0 and q["voxel_error_pct_of_request"] <= 1.0)
    return q, times, before, after


def pin_scenario(s: Session) -> dict:
    """A pinned ball (4 mm) at m, then requests around it: voxels 6-10 mm away lowered and
    raised, a line drag through the pin's neighbourhood, an erase beside it."""
    m = oar_rim_voxel(s)
    sp = np.asarray(s.patient.grid.spacing_mm_zyx, float)
    n0 = len(s.journal)
    s.run(Pin("m", m, 4.0))
    pin_mask = s.pins["m"]
    pinned = s.dose()[pin_mask]
    tol = s.options.tolerance_pct / 100.0 * RX
    rows = []
    mv = np.asarray(m, float)
    reqs = []
    for dy, dx, pct in ((-3, 0, 110), (0, 3, 40), (0, -3, 40), (-4, 2, 105), (1, 4, 30)):
        reqs.append(SetVoxelDose((m[0], m[1] + dy, m[2] + dx), pct / 100 * RX))
    reqs.append(MoveIsodoseLine("z", m[0], 0.95 * RX, (mv[1] - 5 / sp[1], mv[2] + 8 / sp[2]), (mv[1] - 5 / sp[1] + 4 / sp[1], mv[2] + 8 / sp[2])))
    reqs.append(EraseSpot((float(m[0]), mv[1] - 6 / sp[1], float(m[2])), 4.0, 0.5 * RX, 0.9 * RX))
    for req in reqs:
        try:
            res = s.run(req)
        except RequestError as exc:
            rows.append({"request": req.kind, "refused": str(exc)})
            continue
        now = s.dose()[pin_mask]
        dev = float(np.abs(now - pinned).max())
        named = any("pin 'm'" in c.name for c in res.conflicts)
        rows.append({"request": req.kind, "pin_max_change_pct": dev / RX * 100, "within_tolerance": bool(dev <= tol + 1e-3 * RX),
                     "conflict_reported": named, "conflicts": [c.message for c in res.conflicts]})
    silent = sum(1 for r in rows if "refused" not in r and not r["within_tolerance"] and not r["conflict_reported"])
    while len(s.journal) > n0:
        s.undo()
    s.clear_redo()
    worst = max((r.get("pin_max_change_pct", 0.0) for r in rows), default=0.0)
    return {"requests": rows, "silently_broken": silent, "worst_pin_change_pct": worst,
            "tolerance_pct": s.options.tolerance_pct, "goal_met": silent == 0}


def erase_scenario(s: Session) -> dict:
    """Erase the hottest spot of the current (shaped) plan to [95, 103] %, and a 110 % spot made on purpose."""
    out = []
    ptv = s.patient.structure("PTV").mask
    n0 = len(s.journal)
    d = s.dose()
    hot = np.unravel_index(int(np.argmax(np.where(ptv, d, -1))), d.shape)
    cases = [("hottest spot of the shaped plan", None, hot)]
    k = tuple(int(v) for v in np.argwhere(ptv)[len(np.argwhere(ptv)) // 3])
    cases.append(("a 110 % spot made by a request", SetVoxelDose(k, 1.10 * RX), k))
    for name, prep, centre in cases:
        if prep is not None:
            s.run(prep)
        before = s.dose()
        req = EraseSpot(tuple(float(v) for v in centre), 6.0, 0.95 * RX, 1.03 * RX)
        row = {"case": name, **measure_request(s, "erase", req, before)}
        row["spot_max_before_pct"] = float(before[centre] / RX * 100)
        row["goal_met"] = bool(row.get("region_max_over_hi_pct", 99) <= 1.0
                               and row["target_above_hi"][1] <= row["target_above_hi"][0])
        out.append(row)
    while len(s.journal) > n0:
        s.undo()
    s.clear_redo()
    return {"cases": out, "goal_met": all(r["goal_met"] for r in out)}


# (z offset mm, angle from anterior deg) of the ten OAR-rim voxels of the session scenario: rim
# voxels at least as far from the target as the paper's m (7.8 mm), around the OAR.
SESSION_SPOTS = [(0, 0), (0, 90), (0, -90), (6, 0), (-6, 0), (6, 30), (-6, -30), (6, -60), (-6, 60), (12, 0)]
# The goal-6 session is chaotic in float32 round-off (one request's recovery can end 2-3 % of
# Rx apart from a start that differs by round-off): judged on the spot list and four
# variants of it (turned +-10 deg, 2 mm higher, reversed), each from a fresh session.
SESSION_VARIANTS = {
    "as listed": SESSION_SPOTS,
    "turned +10 deg": [(z, a + 10) for z, a in SESSION_SPOTS],
    "turned -10 deg": [(z, a - 10) for z, a in SESSION_SPOTS],
    "2 mm higher": [(z + 2, a) for z, a in SESSION_SPOTS],
    "reversed": list(reversed(SESSION_SPOTS)),
}
# The same with rim voxels only 6.2 mm from the target (central slice, +-15..60 deg): a steeper
# fall-off than m's; reported, not a goal.
SESSION_SPOTS_NEAR = [(0, 0), (0, -30), (0, 30), (0, -60), (0, 60), (-12, -20), (-12, 20), (12, -20), (12, 20), (-20, 0)]


def session_scenario(s: Session, spots=SESSION_SPOTS) -> tuple[dict, np.ndarray]:
    """Ten OAR-rim requests to 55 % in a row."""
    ptv = s.patient.structure("PTV").mask
    oar = s.patient.structure("OAR").mask
    n0 = len(s.journal)
    per = []
    t0 = time.perf_counter()
    for dz, ang in spots:
        m = oar_rim_voxel(s, dz, ang)
        res = s.run(SetVoxelDose(m, 0.55 * RX))
        d = s.dose()
        met = dvh_metrics(d, ptv, RX)
        per.append({"voxel_zyx": list(m), "voxel_pct": float(d[m] / RX * 100), "target_min_pct": met["min_gy"] / RX * 100,
                    "target_max_pct": met["max_gy"] / RX * 100, "target_V95_pct": met["V95_pct"],
                    "oar_mean_gy": float(d[oar].mean()), "conflicts": [c.message for c in res.conflicts]})
    total_s = time.perf_counter() - t0
    d = s.dose()
    met = dvh_metrics(d, ptv, RX)
    final_voxels = [float(d[tuple(p["voxel_zyx"])] / RX * 100) for p in per]
    out = {"requests": per, "target_V95_pct": met["V95_pct"], "target_min_pct": met["min_gy"] / RX * 100,
           "target_max_pct": met["max_gy"] / RX * 100, "oar_mean_gy": float(d[oar].mean()),
           "rim_voxels_final_pct": final_voxels, "total_s": total_s}
    out["goal_met"] = bool(out["target_V95_pct"] >= 99.0 and out["target_min_pct"] >= 93.0 and out["target_max_pct"] <= 110.0
                           and out["oar_mean_gy"] <= 48.2)
    state = s.dose()
    while len(s.journal) > n0:
        s.undo()
    s.clear_redo()
    return out, state


def summarise_survey(rows: list[dict]) -> dict:
    done = [r for r in rows if "refused" not in r]
    over = np.array([r["overshoot_pct"] for r in done])
    far = np.array([r["rise_far_pct"] for r in done])
    off_path = np.array([r["rise_off_path_pct"] for r in done])
    beyond = np.array([r.get("rise_beyond_shift_pct", r["rise_far_pct"]) for r in done])
    drags = [r for r in done if r["kind"] in ("line", "surface")]
    land = np.array([r["landing_mm"] if r["landing_mm"] is not None else np.inf for r in drags])
    beside = np.array([max(r["beside_mm"]) if r["beside_mm"] else 0.0 for r in drags])
    erases = [r for r in done if r["kind"] == "erase"]
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    worst = max(done, key=lambda r: max(r["overshoot_pct"], r["rise_far_pct"] - 2.0)) if done else {}
    out = {
        "requests": len(rows), "refused": len(rows) - len(done),
        "by_kind": {k: sum(1 for r in rows if r["kind"] == k) for k in ("line", "surface", "erase")},
        "overshoot_pct": {"median": pct(over, 50), "p90": pct(over, 90), "max": float(over.max()) if over.size else None},
        "rise_far_pct": {"median": pct(far, 50), "p90": pct(far, 90), "max": float(far.max()) if far.size else None},
        "rise_off_path_pct": {"median": pct(off_path, 50), "p90": pct(off_path, 90),
                              "max": float(off_path.max()) if off_path.size else None},
        "requests_over_3pct": int((over > 3.0).sum()), "requests_rise_over_5pct": int((far > 5.0).sum()),
        "requests_rise_off_path_over_5pct": int((off_path > 5.0).sum()),
        "rise_beyond_shift_pct": {"median": pct(beyond, 50), "p90": pct(beyond, 90),
                                  "max": float(beyond.max()) if beyond.size else None},
        "requests_rise_beyond_shift_over_5pct": int((beyond > 5.0).sum()),
        "landing_mm": {"median": pct(land[np.isfinite(land)], 50), "p90": pct(land[np.isfinite(land)], 90),
                       "max": float(land.max()) if land.size else None, "not_found": int((~np.isfinite(land)).sum())},
        "beside_mm": {"median": pct(beside, 50), "p90": pct(beside, 90), "max": float(beside.max()) if beside.size else None},
        "drags_beside_over_1mm": int((beside >= 1.0).sum()), "drags": len(drags),
        "erase_region_over_hi_plus_1pct": int(sum(1 for r in erases if r["region_max_over_hi_pct"] > 1.0)),
        "erase_target_above_hi_rose": int(sum(1 for r in erases if r["target_above_hi"][1] > r["target_above_hi"][0])),
        "landing_mm_without_conflicts": {
            "max": float(max((r["landing_mm"] if r["landing_mm"] is not None else np.inf) for r in drags if not r["conflicts"]))
            if any(not r["conflicts"] for r in drags) else None},
        "refused_reasons": {k: sum(1 for r in rows if r.get("refused", "").startswith(k)) for k in
                            sorted({r["refused"].split(":")[0] + ":" + r["refused"].split(":")[1][:30] for r in rows if "refused" in r})},
        "worst_request": {k: v for k, v in worst.items() if k != "conflicts"},
        "conflicts_reported": int(sum(1 for r in done if r["conflicts"])),
        # Never silent: every unasked far rise above report_rise_pct is reported as a side effect.
        "requests_rise_reportable_over_5pct": int(sum(1 for r in done if r.get("rise_reportable_pct", 0.0) > 5.0)),
        "side_effects_reported": int(sum(1 for r in done if r.get("side_effects"))),
        "side_effects_missed": int(sum(1 for r in done if r.get("side_effect_missed"))),
        "side_effect_repairs_kept": int(sum(1 for r in done if r.get("side_effects_repaired"))),
        # Target voxels a request left below coverage (reported as conflicts of kind "coverage").
        "requests_leaving_target_below_coverage": int(sum(1 for r in done if r.get("coverage_short_gy", 0.0) > 0)),
        "coverage_short_pct_max": float(max((r.get("coverage_short_gy", 0.0) for r in done), default=0.0) / RX * 100),
        # Refused up front: a fall-off no beam can make (ids_engine.dmr._feasible).
        "refused_infeasible": int(sum(1 for r in rows if "cannot make that fall-off" in r.get("refused", ""))),
    }
    out["goal2_met"] = bool(out["requests_over_3pct"] == 0 and out["requests_rise_over_5pct"] == 0)
    out["goal2_met_beyond_rigid_shift"] = bool(out["requests_over_3pct"] == 0 and out["requests_rise_beyond_shift_over_5pct"] == 0)
    out["goal2_met_outside_beam_paths"] = bool(out["requests_over_3pct"] == 0 and out["requests_rise_off_path_over_5pct"] == 0)
    out["goal3_met"] = bool(out["landing_mm"]["median"] <= 1.0 and np.isfinite(land).all() and land.max() <= 2.0
                            and out["beside_mm"]["max"] < 1.0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--quick", action="store_true", help="every fourth survey request (development)")
    ap.add_argument("--skip-survey", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=RX)
    setup_s = time.perf_counter() - t0
    print(f"set-up {setup_s:.1f} s")
    quality: dict = {}

    paper, paper_ms, dose_open, dose_paper = paper_experiment(s)
    quality["paper_experiment"] = paper
    print("paper experiment:", {k: v for k, v in paper.items() if k != "conflicts"})
    # The plan now carries the paper's request: the "already shaped" state.
    quality["pins"] = pin_scenario(s)
    print("pins:", {k: v for k, v in quality["pins"].items() if k != "requests"})
    quality["erase"] = erase_scenario(s)
    print("erase:", [{k: v for k, v in r.items() if k in ("case", "region_max_over_hi_pct", "target_above_hi", "goal_met")}
                     for r in quality["erase"]["cases"]])
    rows = []
    if not args.skip_survey:
        rows += run_survey(s, args.quick, "shaped (after the paper experiment)")
    s.undo()
    s.clear_redo()
    if not args.skip_survey:
        rows += run_survey(s, args.quick, "open-field plan")
        quality["survey"] = summarise_survey(rows)
        print("survey:", {k: v for k, v in quality["survey"].items() if k != "worst_request"})
        print("  worst:", quality["survey"]["worst_request"])
    # The sessions start from the exact open-field plan (a fresh session each): ten requests
    # in a row are sensitive to the float32 round-off that older undos leave in the plan
    # (measured: OAR mean 48.19-48.34 Gy from perturbed starts, 48.25 Gy from the exact one).
    s.close()
    s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=RX)
    sess, dose_sess = session_scenario(s)
    quality["session"] = sess
    print("session:", {k: v for k, v in sess.items() if k != "requests"})
    s.close()
    s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=RX)
    near, _ = session_scenario(s, SESSION_SPOTS_NEAR)
    quality["session_near_rim"] = near
    print("session (rim voxels 6.2 mm from the target):", {k: v for k, v in near.items() if k != "requests"})
    if not args.quick:
        variants = {}
        for name, spots in SESSION_VARIANTS.items():
            if name == "as listed":
                out = sess
            else:
                s.close()
                s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=RX)
                out, _ = session_scenario(s, spots)
            variants[name] = {k: v for k, v in out.items() if k != "requests"}
            print(f"session, spots {name}:", {k: round(v, 3) if isinstance(v, float) else v
                                              for k, v in variants[name].items() if k != "rim_voxels_final_pct"})
        quality["session_variants"] = {
            "variants": variants,
            "worst_target_min_pct": min(v["target_min_pct"] for v in variants.values()),
            "worst_target_V95_pct": min(v["target_V95_pct"] for v in variants.values()),
            "worst_target_max_pct": max(v["target_max_pct"] for v in variants.values()),
            "oar_mean_gy_mean": float(np.mean([v["oar_mean_gy"] for v in variants.values()])),
            "oar_mean_gy_worst": max(v["oar_mean_gy"] for v in variants.values()),
            "goal_met_all": all(v["goal_met"] for v in variants.values()),
        }

    stages = {"whole_request": stats(paper_ms)}
    if rows:
        stages["survey_request"] = stats([r["ms"] for r in rows if "ms" in r])
    stages["session_request"] = stats([sess["total_s"] * 1000 / len(sess["requests"])])
    quality["speed"] = {"whole_request_median_ms": stages["whole_request"]["median_ms"], "budget_ms": 1200.0,
                        "goal_met": bool(stages["whole_request"]["median_ms"] <= 1200.0)}
    quality["setup_s"] = round(setup_s, 2)
    case = {"phantom": "horseshoe", "resolution": args.resolution,
            **{k: v for k, v in s.engine.describe().items() if k != "backend"},
            "prescription_gy": RX, "dmr_options": dict(s.options.__dict__), "quick": bool(args.quick)}
    path = write_result("shaping-horseshoe", case, stages,
                        reference={"source": "IDS paper Table 1 (modify + 25 recovery steps)", "stages_ms": {"whole_request": 5000.0}},
                        quality={**quality, "survey_rows": rows})
    info = backend.backend_info()
    print_table(f"Shaping, horseshoe ({args.resolution}), 9 beams, {info.name} on {info.device}", stages, {"whole_request": 5000.0})
    print("\nGoals:")
    goals = [("1 paper experiment", paper["goal_met"]), ("4 pins", quality["pins"]["goal_met"]),
             ("5 erase", quality["erase"]["goal_met"]), ("6 session", sess["goal_met"]), ("7 speed", quality["speed"]["goal_met"])]
    if "session_variants" in quality:
        goals.insert(-1, ("6 (all 5 spot lists)", quality["session_variants"]["goal_met_all"]))
    if "survey" in quality:
        goals[1:1] = [("2 no blow-ups", quality["survey"]["goal2_met"]),
                      ("2 (beyond rigid move)", quality["survey"]["goal2_met_beyond_rigid_shift"]),
                      ("2 (outside beam paths)", quality["survey"]["goal2_met_outside_beam_paths"]),
                      ("2 far rises reported", quality["survey"]["side_effects_missed"] == 0),
                      ("3 isodoses land", quality["survey"]["goal3_met"])]
    for name, ok in goals:
        print(f"  {name:<24} {'met' if ok else 'NOT met'}")
    png = _picture(s, paper, dose_open, dose_paper, dose_sess, rows, sess)
    print(f"  -> {path}\n  -> {png}")
    return 0


def _picture(s: Session, paper: dict, dose_open, dose_paper, dose_sess, rows, sess) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no PNG; pip install 'ids-engine[bench]')")
        return None
    g = s.patient.grid
    m = tuple(paper["voxel_zyx"])
    k = m[0]
    x, y = g.axis_mm("x"), g.axis_mm("y")
    ext = (x[0], x[-1], y[-1], y[0])
    fig, axes = plt.subplots(2, 3, figsize=(16, 10), constrained_layout=True)
    for ax, d, title in zip(axes[0], (dose_open, dose_paper, dose_sess),
                            ("open-field plan", f"paper experiment: m to 55 % ({paper['recovery_steps']} steps)",
                             "after ten OAR-rim requests to 55 %")):
        ax.imshow(s.patient.ct_hu[k], cmap="gray", vmin=-200, vmax=200, extent=ext)
        for st, col in ((s.patient.structure("PTV"), "tab:red"), (s.patient.structure("OAR"), "tab:cyan")):
            ax.contour(x, y, st.mask[k].astype(float), levels=[0.5], colors=[col], linewidths=1.0)
        cs = ax.contour(x, y, d[k] / RX * 100, levels=[55, 95, 107], colors=["tab:blue", "tab:green", "tab:orange"], linewidths=1.3)
        ax.clabel(cs, fmt="%d%%", fontsize=8)
        ax.set_xlim(-90, 90)
        ax.set_ylim(70, -90)
        ptv = s.patient.structure("PTV").mask
        ax.set_title(f"{title}\ntarget min {d[ptv].min() / RX * 100:.1f} %, max {d[ptv].max() / RX * 100:.1f} %, "
                     f"OAR mean {d[s.patient.structure('OAR').mask].mean():.1f} Gy", fontsize=9)
    done = [r for r in rows if "refused" not in r]
    ax = axes[1, 0]
    land = [r["landing_mm"] for r in done if r.get("landing_mm") is not None]
    beside = [max(r["beside_mm"]) for r in done if r.get("beside_mm")]
    if land:
        ax.hist(land, bins=np.linspace(0, 3, 31), alpha=0.7, label="level to drag end")
        ax.hist(np.minimum(beside, 3), bins=np.linspace(0, 3, 31), alpha=0.7, label="shift 10 mm beside")
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.legend(fontsize=8)
    ax.set_xlabel("mm")
    ax.set_title(f"isodose drags ({len(land)}): where the level lands", fontsize=9)
    ax = axes[1, 1]
    if done:
        ax.hist([r["overshoot_pct"] for r in done], bins=30, alpha=0.7, label="request voxel beyond its value")
        ax.hist([r["rise_far_pct"] for r in done], bins=30, alpha=0.7, label="rise > 10 mm from the request")
        ax.hist([r.get("rise_beyond_shift_pct", r["rise_far_pct"]) for r in done], bins=30, alpha=0.7,
                label="... beyond a rigid move of the dragged dose")
        ax.hist([r["rise_off_path_pct"] for r in done], bins=30, alpha=0.7,
                label="... and outside the beam paths through it")
        ax.axvline(paper["rise_far_pct"], color="tab:red", ls=":", lw=0.8, label="the paper's experiment (goal 1)")
        ax.axvline(3.0, color="tab:blue", ls="--", lw=0.8)
        ax.axvline(5.0, color="tab:orange", ls="--", lw=0.8)
        ax.legend(fontsize=8)
    ax.set_xlabel("% of the prescription")
    ax.set_title(f"survey of {len(rows)} joint requests: overshoot and far rises", fontsize=9)
    ax = axes[1, 2]
    per = sess["requests"]
    n = np.arange(1, len(per) + 1)
    ax.plot(n, [p["target_min_pct"] for p in per], "o-", label="target min %")
    ax.plot(n, [p["target_max_pct"] for p in per], "o-", label="target max %")
    ax.plot(n, [p["target_V95_pct"] for p in per], "o-", label="target V95 %")
    ax2 = ax.twinx()
    ax2.plot(n, [p["oar_mean_gy"] for p in per], "s--", color="tab:cyan", label="OAR mean Gy")
    ax2.set_ylabel("OAR mean (Gy)")
    ax.axhline(93, color="tab:blue", lw=0.6, ls=":")
    ax.axhline(110, color="tab:orange", lw=0.6, ls=":")
    ax.set_xlabel("request")
    ax.legend(fontsize=8, loc="lower left")
    ax2.legend(fontsize=8, loc="lower right")
    ax.set_title("a session of ten OAR-rim requests", fontsize=9)
    info = backend.backend_info()
    out = RESULTS / f"shaping-horseshoe-{info.name}-{device_slug(info.device if info.name == 'cupy' else 'cpu')}.png"
    fig.suptitle("Dose shaping quality, horseshoe phantom, 9 beams, 60 Gy")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
