"""Point-based rigid registration of matched fiducial markers (claims 5, 6 and 12 of seed 003).

Markers (implanted seeds, or skin markers located by a tracking system calibrated to the
CT, claim 6) are matched by label between the planning CT and the new CT; the rigid
transform that best superimposes them in the least-squares sense is found in closed form
(Kabsch 1976 / Arun, Huang and Blostein 1987: SVD of the cross-covariance, with the
reflection guard of Umeyama 1991). The residual of every marker (its fiducial registration
error) and their RMS are reported in ``metrics``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..model import Grid
from ._registration import Registration, RegistrationError

__all__ = ["locate_markers", "match_markers", "read_fiducials", "register_fiducials", "write_fiducials"]

# A marker set whose second principal extent (RMS distance from the best line) is below
# this is collinear: the rotation about that line is undetermined.
COLLINEAR_TOLERANCE_MM = 1e-3


def _as_matched(planning, new, labels) -> tuple[list[str], np.ndarray, np.ndarray]:
    if isinstance(planning, dict) or isinstance(new, dict):
        if not (isinstance(planning, dict) and isinstance(new, dict)):
            raise RegistrationError("register_fiducials: give both marker sets as dicts (label -> point) or both as arrays")
        only_p = sorted(set(planning) - set(new))
        only_n = sorted(set(new) - set(planning))
        if only_p or only_n:
            parts = []
            if only_p:
                parts.append(f"only in the planning set: {', '.join(map(str, only_p))}")
            if only_n:
                parts.append(f"only in the new set: {', '.join(map(str, only_n))}")
            raise RegistrationError("register_fiducials: unmatched marker labels (" + "; ".join(parts) + ")")
        names = list(labels) if labels is not None else sorted(planning, key=str)
        missing = [n for n in names if n not in planning]
        if missing:
            raise RegistrationError(f"register_fiducials: labels {missing} are not among the markers")
        p = np.asarray([planning[n] for n in names], dtype=np.float64)
        q = np.asarray([new[n] for n in names], dtype=np.float64)
    else:
        p = np.asarray(planning, dtype=np.float64)
        q = np.asarray(new, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise RegistrationError(f"planning_points_xyz must be (N, 3) mm, got shape {p.shape}")
        if q.shape != p.shape:
            raise RegistrationError(f"new_points_xyz shape {q.shape} does not match planning_points_xyz {p.shape} "
                                    "(markers are matched by position in the lists)")
        names = [str(v) for v in labels] if labels is not None else [f"M{i + 1}" for i in range(len(p))]
        if len(names) != len(p):
            raise RegistrationError(f"labels: {len(names)} labels for {len(p)} markers")
    if len(set(names)) != len(names):
        raise RegistrationError("register_fiducials: marker labels must be unique")
    for arr, what in ((p, "planning"), (q, "new")):
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise RegistrationError(f"{what} markers must be (x, y, z) points, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise RegistrationError(f"{what} markers hold non-finite coordinates")
    if len(p) < 3:
        raise RegistrationError(f"register_fiducials: need at least 3 matched markers for a rigid registration, got {len(p)}")
    return names, p, q


def _check_not_collinear(points: np.ndarray, what: str) -> None:
    s = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    if s[1] / math.sqrt(len(points)) < COLLINEAR_TOLERANCE_MM:
        raise RegistrationError(f"register_fiducials: the {what} markers are collinear (or coincide): "
                                "the rotation about their line is undetermined; add a marker off the line")


def kabsch(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid ``(R, t)`` with ``q ~ R @ p + t`` for matched points ``(N, 3)`` (proper rotation)."""
    cp, cq = p.mean(axis=0), q.mean(axis=0)
    h = (p - cp).T @ (q - cq)
    u, _, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    return r, cq - r @ cp


def register_fiducials(planning_points_xyz, new_points_xyz, *, labels=None, planning_grid: Grid,
                       new_grid: Grid) -> Registration:
    """Rigid registration from matched markers (x, y, z mm, patient coordinates of each CT).

    Parameters
    ----------
    planning_points_xyz, new_points_xyz : either dicts ``label -> (x, y, z)`` (matched by
        label; every label must be in both) or ``(N, 3)`` arrays matched by row.
    labels : with arrays, the marker names (default M1..MN); with dicts, the labels to use
        (default all, sorted).
    planning_grid, new_grid : the two CT grids.

    Returns
    -------
    Registration
        kind "fiducial"; ``metrics``: ``labels``, ``residual_mm`` (per marker, after
        registration), ``rms_residual_mm``, ``max_residual_mm``, ``markers``.

    Raises
    ------
    RegistrationError
        fewer than 3 markers, unmatched labels, collinear markers, bad shapes.
    """
    names, p, q = _as_matched(planning_points_xyz, new_points_xyz, labels)
    _check_not_collinear(p, "planning")
    _check_not_collinear(q, "new")
    r, t = kabsch(p, q)
    resid = np.linalg.norm(p @ r.T + t - q, axis=1)
    metrics = {
        "metric": "fiducial least squares (Kabsch)",
        "markers": len(names),
        "labels": names,
        "residual_mm": [float(v) for v in resid],
        "rms_residual_mm": float(np.sqrt(np.mean(resid**2))),
        "max_residual_mm": float(resid.max()),
    }
    return Registration("fiducial", planning_grid, new_grid, r, t, metrics=metrics)


def read_fiducials(path) -> dict[str, tuple[float, float, float]]:
    """Read a marker file: CSV lines ``label,x_mm,y_mm,z_mm`` (patient coordinates, mm).

    Blank lines and lines starting with ``#`` are skipped; a first line whose coordinates
    are not numbers (e.g. ``label,x_mm,y_mm,z_mm``) is taken as a header. Labels must be
    unique. Errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistrationError(f"{path}: cannot read the marker file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RegistrationError(f"{path}: not a text (UTF-8) marker file") from exc
    out: dict[str, tuple[float, float, float]] = {}
    first = True
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 4:
            raise RegistrationError(f"{path}: line {n}: expected 4 fields label,x_mm,y_mm,z_mm, got {len(cells)}")
        try:
            xyz = tuple(float(c) for c in cells[1:])
        except ValueError:
            # A header names its columns (no number in them at all); a marker line with a
            # mistyped number is an error, even on the first line.
            if first and not any(_is_number(c) for c in cells[1:]):
                first = False
                continue
            raise RegistrationError(f"{path}: line {n}: coordinates must be numbers (mm), got {cells[1:]}") from None
        first = False
        if not all(math.isfinite(v) for v in xyz):
            raise RegistrationError(f"{path}: line {n}: coordinates must be finite")
        label = cells[0]
        if not label:
            raise RegistrationError(f"{path}: line {n}: empty label")
        if label in out:
            raise RegistrationError(f"{path}: line {n}: duplicate label {label!r}")
        out[label] = xyz  # type: ignore[assignment]
    if not out:
        raise RegistrationError(f"{path}: no markers (expected lines label,x_mm,y_mm,z_mm)")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_fiducials(path, markers: dict) -> Path:
    """Write markers ``label -> (x, y, z)`` mm in the format :func:`read_fiducials` reads."""
    from .._files import atomic_text

    path = Path(path)
    lines = ["label,x_mm,y_mm,z_mm"]
    for label, p in markers.items():
        if "," in str(label):
            raise RegistrationError(f"marker label {label!r} must not contain a comma")
        lines.append(f"{label},{float(p[0]):.4f},{float(p[1]):.4f},{float(p[2]):.4f}")
    atomic_text(path, "\n".join(lines) + "\n")
    return path


def locate_markers(patient, *, threshold_hu: float = 200.0, max_volume_mm3: float = 500.0,
                   region=None) -> np.ndarray:
    """Centres of the radio-opaque markers (implanted seeds) visible in a CT, ``(N, 3)`` x, y, z mm.

    Voxels above ``threshold_hu`` are grouped into 26-connected components; components larger
    than ``max_volume_mm3`` and than 27 voxels (bone, metal implants) are ignored. Each centre is the centroid of
    the component grown by one voxel, weighted by HU above the local background (the median
    of the grown shell, clipped at 0): for a seed smaller than a voxel, blurred by the
    scanner or by trilinear resampling, this recovers its position to a small fraction of a
    voxel (linear interpolation keeps the first moment). The default threshold (200 HU)
    still finds a 2500 HU seed spread over eight voxels by resampling; spurious small bright
    spots are left to :func:`match_markers`. ``region`` (bool (z, y, x)) restricts the
    search, e.g. to a field of view. Sorted by z, y, x.
    """
    from scipy import ndimage

    ct = np.asarray(patient.ct_hu, dtype=np.float64)
    g = patient.grid
    hot = ct > float(threshold_hu)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != ct.shape:
            raise RegistrationError(f"locate_markers: region shape {region.shape} does not match the CT {ct.shape}")
        hot &= region
    labels, n = ndimage.label(hot, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros((0, 3))
    max_voxels = float(max_volume_mm3) / (g.voxel_volume_cc * 1000.0)
    centres = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        if comp.sum() > max(max_voxels, 27.0):  # a seed blurred over 3x3x3 voxels still counts
            continue
        lo = [max(s.start - 1, 0) for s in sl]
        hi = [min(s.stop + 1, n_) for s, n_ in zip(sl, ct.shape)]
        big = tuple(slice(a, b) for a, b in zip(lo, hi))
        grown = ndimage.binary_dilation(np.pad(comp, [(s.start - a, b - s.stop) for s, a, b in zip(sl, lo, hi)]),
                                        structure=np.ones((3, 3, 3), bool))
        local = ct[big]
        shell = grown & ~np.pad(comp, [(s.start - a, b - s.stop) for s, a, b in zip(sl, lo, hi)])
        background = float(np.median(local[shell])) if shell.any() else 0.0
        idx = np.argwhere(grown)
        # Voxels within the tissue's own variation (3 robust standard deviations of the
        # shell) carry no marker signal and would pull the centre towards the shell's centre.
        spread = 1.4826 * float(np.median(np.abs(local[shell] - background))) if shell.any() else 0.0
        excess = local[grown] - background
        ww = np.where(excess > 3.0 * spread, excess, 0.0)
        centre = (idx * ww[:, None]).sum(axis=0) / ww.sum() + np.asarray(lo)
        centres.append(g.index_to_world(centre))
    if not centres:
        return np.zeros((0, 3))
    pts = np.asarray(centres)
    return pts[np.lexsort((pts[:, 0], pts[:, 1], pts[:, 2]))]


def match_markers(planning_markers: dict, found_xyz, *, registration=None, max_distance_mm: float = 10.0) -> dict:
    """Label the markers found in a new CT after the planning markers they are.

    Each planning marker is predicted in the new CT through ``registration`` (the identity
    when None: same couch frame) and paired with the nearest found marker, closest pairs
    first, each found marker used once.

    Raises
    ------
    RegistrationError
        a planning marker has no found marker within ``max_distance_mm`` (names it).
    """
    found = np.asarray(found_xyz, dtype=np.float64).reshape(-1, 3)
    labels = list(planning_markers)
    pred = np.asarray([planning_markers[k] for k in labels], dtype=np.float64).reshape(-1, 3)
    if registration is not None:
        pred = registration.map_points_xyz(pred)
    if len(found) == 0:
        raise RegistrationError("match_markers: no markers were found in the new CT")
    dist = np.linalg.norm(pred[:, None, :] - found[None, :, :], axis=-1)
    out: dict = {}
    used: set = set()
    for flat in np.argsort(dist, axis=None):
        i, j = np.unravel_index(flat, dist.shape)
        if labels[i] in out or j in used or dist[i, j] > max_distance_mm:
            continue
        out[labels[i]] = tuple(float(v) for v in found[j])
        used.add(j)
    missing = [k for k in labels if k not in out]
    if missing:
        raise RegistrationError(f"match_markers: no marker found within {max_distance_mm:g} mm of "
                                f"{', '.join(map(str, missing))} in the new CT")
    return {k: out[k] for k in labels}
