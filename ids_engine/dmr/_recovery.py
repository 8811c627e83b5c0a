"""Dose recovery (section 2.3 of the IDS paper): undo the side effects of a modification.

* Reference: the dose before the request (``reference_gy`` at the candidate voxels).
* Candidates: voxels of the targets, the OARs and any pinned region, outside the requested
  feature, whose dose left the reference by more than ``tol_gy``: in either direction for
  targets and pins, only upwards for OARs (an OAR voxel that got colder is no harm: that is
  how the requested feature grows into its neighbourhood, as the paper's figure 7 shows).
  Second-degree hot or cold spots made by earlier recovery patches qualify as soon as they
  leave the tolerance.
* Order: a chamfer distance transform (Borgefors 1984; ``scipy.ndimage.distance_transform_cdt``,
  chessboard metric, in voxels) from the requested feature. Rule: the next voxel is the
  candidate with the largest ``distance x |deviation|``: farthest first when deviations are
  alike, closing in on the request, and a large deviation is not left for last.
* The requested feature is itself watched, with the requested doses as reference; when a
  recovery step has pushed a feature voxel out of tolerance, it is restored next (the paper's
  "compromising patches" are allowed, but only within the tolerance).
* Step: a modification of that voxel back to its reference dose (competing-tissue TPI:
  restoring a cold target voxel raises the dose and uses the OARs' TPI), applied before the
  next choice so that the next candidate sees its effect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ids_engine import backend

__all__ = ["RecoveryResult", "distance_grid", "recover"]


@dataclass(frozen=True, eq=False)
class RecoveryResult:
    """What recovery did: the voxels restored in order, their doses, the patches applied, timings."""

    steps: int
    voxels: np.ndarray
    reference_gy: np.ndarray
    achieved_gy: np.ndarray
    remaining_candidates: int
    patches: list = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)


def distance_grid(request_mask_zyx: np.ndarray, candidates_flat: np.ndarray, shape_zyx) -> np.ndarray:
    """Chamfer (chessboard) distance in voxels from the requested feature, at the candidate voxels.

    Computed on the bounding box of the request and the candidates only.
    """
    req = np.argwhere(request_mask_zyx)
    if req.size == 0:
        raise ValueError("distance_grid: the request has no voxel")
    cand = np.stack(np.unravel_index(candidates_flat, shape_zyx), axis=-1) if candidates_flat.size else req[:0]
    pts = np.concatenate([req, cand]) if cand.size else req
    lo = pts.min(axis=0)
    hi = pts.max(axis=0) + 1
    box = request_mask_zyx[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dist = ndimage.distance_transform_cdt(~box, metric="chessboard")
    if not cand.size:
        return np.zeros(0, np.float64)
    c = cand - lo
    return dist[c[:, 0], c[:, 1], c[:, 2]].astype(np.float64)


def recover(modifier, candidates_flat: np.ndarray, reference_gy: np.ndarray, request_mask_zyx: np.ndarray, *,
            steps: int = 25, tol_gy, only_hotter: np.ndarray | None = None,
            feature: np.ndarray | None = None, cancel=None, progress=None) -> RecoveryResult:
    """Run up to ``steps`` recovery steps on ``modifier.engine``.

    Parameters
    ----------
    modifier : a :class:`Modifier` on the engine.
    candidates_flat : (n,) flat CT indices of the voxels recovery watches (targets, OARs, pins),
        the requested feature already removed.
    reference_gy : (n,) their dose before the request.
    request_mask_zyx : bool (z, y, x): the requested feature (distances are measured from it).
    steps : maximum number of steps; stops early when no candidate is out of tolerance.
    tol_gy : tolerance on |D - D_ref| (Gy): one number, or one per candidate.
    only_hotter : optional bool (n,): candidates that count only when hotter than the reference (OARs).
    feature : optional bool (n,): candidates that belong to the requested feature (reference =
        requested dose); when one of them has drifted out of tolerance it is restored first, so
        recovery may compromise the request only within the tolerance.
    cancel : optional callable returning True to stop between steps.
    progress : optional ``progress(done, total, label)``.
    """
    eng = modifier.engine
    xp = eng.xp
    timings = {"distance_grid": 0.0, "select_location": 0.0, "modify_step": 0.0}
    t0 = time.perf_counter()
    dist = distance_grid(request_mask_zyx, candidates_flat, eng.grid.shape_zyx)
    timings["distance_grid"] = (time.perf_counter() - t0) * 1000
    cand_dev = xp.asarray(candidates_flat.astype(np.int64))
    ref_dev = xp.asarray(reference_gy.astype(np.float32))
    dist_dev = xp.asarray(dist.astype(np.float32))
    hotter_dev = xp.asarray(np.zeros(candidates_flat.size, bool) if only_hotter is None else np.asarray(only_hotter, bool))
    feature_dev = xp.asarray(np.zeros(candidates_flat.size, bool) if feature is None else np.asarray(feature, bool))
    tol_dev = xp.asarray(np.broadcast_to(np.asarray(tol_gy, np.float32), candidates_flat.shape).copy())

    def out_of_tolerance(dev):
        return xp.where(hotter_dev, dev > tol_dev, xp.abs(dev) > tol_dev)
    chosen, refs, got, patches = [], [], [], []
    remaining = 0
    n_done = 0
    for step in range(steps):
        if cancel is not None and cancel():
            break
        t0 = time.perf_counter()
        dose = eng.dose_at_voxels(cand_dev)
        dev = dose - ref_dev
        out = out_of_tolerance(dev)
        remaining = int(out.sum())
        if remaining == 0:
            timings["select_location"] += (time.perf_counter() - t0) * 1000
            break
        score = xp.where(out, (dist_dev + 1.0) * xp.abs(dev), xp.float32(-1))
        # A drifted feature voxel goes first (its score is lifted above every other).
        score = xp.where(out & feature_dev, score + xp.float32(1e9), score)
        k = int(xp.argmax(score))
        timings["select_location"] += (time.perf_counter() - t0) * 1000
        voxel = int(candidates_flat[k])
        t0 = time.perf_counter()
        res = modifier.modify([voxel], [float(reference_gy[k])], max_passes=2)
        timings["modify_step"] += (time.perf_counter() - t0) * 1000
        chosen.append(voxel)
        refs.append(float(reference_gy[k]))
        got.append(float(res.achieved_gy[0]))
        patches.extend(res.patches)
        n_done = step + 1
        if progress:
            progress(n_done, steps, "recovery")
    else:
        dose = eng.dose_at_voxels(cand_dev)
        remaining = int(out_of_tolerance(dose - ref_dev).sum())
    backend.synchronize()
    return RecoveryResult(n_done, np.asarray(chosen, np.int64), np.asarray(refs), np.asarray(got), remaining,
                          patches, timings)
