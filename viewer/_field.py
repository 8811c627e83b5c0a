"""Open-field dose display for phantoms without a target (water box, slab box): one beam,
its central-axis depth dose and a cross-plane profile (host NumPy, no Qt).

A phantom without a target has nothing to shape dose for, so the viewer opens it as a
dose-display case: one open square field at the phantom's isocentre, normalised so the
central-axis maximum is the prescription, with its depth dose and profile sampled from the
dose cube (trilinear, the way a water-tank scan reads a measured dose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ids_engine.model import Beam, Grid, Patient
from ids_engine.session import Session

__all__ = ["FIELD_SIZE_MM", "PROFILE_DEPTH_MM", "FieldCurves", "field_curves", "open_field_display_session"]

# The open field of a dose-display case: 10 x 10 cm at the isocentre (the reference field).
FIELD_SIZE_MM = 100.0
# Depth of the cross-plane profile below the surface (the reference depth of TRS-398).
PROFILE_DEPTH_MM = 100.0
_STEP_MM = 1.0


@dataclass(frozen=True, eq=False)
class FieldCurves:
    """An open field's central-axis depth dose and a profile across it (host float64).

    depth_mm : (n,) depth below the body surface along the central axis, mm.
    depth_dose_gy : (n,) dose at those depths, Gy.
    offaxis_mm : (m,) distance from the central axis along the beam's X_b (IEC beam limiting
        device) direction at ``profile_depth_mm``, mm, projected to that depth.
    profile_gy : (m,) dose across the field at ``profile_depth_mm``, Gy.
    max_gy : the central-axis maximum (the 100 % of the curves), at ``dmax_mm`` deep.
    ssd_mm : source-surface distance along the central axis, mm.
    """

    beam_name: str
    depth_mm: np.ndarray
    depth_dose_gy: np.ndarray
    profile_depth_mm: float
    offaxis_mm: np.ndarray
    profile_gy: np.ndarray
    max_gy: float
    dmax_mm: float
    ssd_mm: float

    def depth_dose_pct(self) -> np.ndarray:
        return 100.0 * self.depth_dose_gy / self.max_gy if self.max_gy > 0 else np.zeros_like(self.depth_dose_gy)

    def profile_pct(self) -> np.ndarray:
        return 100.0 * self.profile_gy / self.max_gy if self.max_gy > 0 else np.zeros_like(self.profile_gy)


def _sample(volume: np.ndarray, grid: Grid, points_xyz: np.ndarray, order: int = 1) -> np.ndarray:
    idx = grid.world_to_index(points_xyz).reshape(-1, 3).T
    return ndimage.map_coordinates(np.asarray(volume, np.float64), idx, order=order, mode="constant", cval=0.0)


def field_curves(dose_gy: np.ndarray, grid: Grid, beam: Beam, body_mask: np.ndarray, *, patient_position: str = "HFS",
                 profile_depth_mm: float = PROFILE_DEPTH_MM) -> FieldCurves | None:
    """The central-axis depth dose and a profile of ``beam`` in ``dose_gy``; None when the
    central axis misses the body.

    Parameters
    ----------
    dose_gy : (z, y, x) float, Gy, on ``grid``.
    grid : the dose grid.
    beam : the beam (its source, central axis and SAD).
    body_mask : (z, y, x) bool, the body (where depth is measured from).
    patient_position : the patient's DICOM position (HFS, ...).
    profile_depth_mm : depth of the profile below the surface, mm (clamped to the body).
    """
    source = beam.source_mm_xyz(patient_position)
    axis = beam.direction_xyz(patient_position)
    reach = 2.0 * beam.sad_mm
    dist = np.arange(0.0, reach, _STEP_MM)
    pts = source + dist[:, None] * axis
    inside = grid.contains(pts)
    if not inside.any():
        return None
    body = _sample(body_mask.astype(np.float32), grid, pts, order=0) > 0.5
    if not body.any():
        return None
    first, last = int(np.argmax(body)), len(body) - 1 - int(np.argmax(body[::-1]))
    entry = dist[first]
    depth = dist[first : last + 1] - entry
    pdd = _sample(dose_gy, grid, pts[first : last + 1])
    k = int(np.argmax(pdd))
    max_gy, dmax = float(pdd[k]), float(depth[k])
    d_prof = float(np.clip(profile_depth_mm, 0.0, depth[-1]))
    distance = entry + d_prof  # from the source along the central axis
    half = 1.5 * FIELD_SIZE_MM / 2.0 * distance / beam.sad_mm + 20.0
    off = np.arange(-half, half + 0.5 * _STEP_MM, _STEP_MM)
    u_iso = off * beam.sad_mm / distance  # to the isocentre plane, where the BEV lives
    prof_pts = beam.bev_to_patient(u_iso, np.zeros_like(u_iso), np.full_like(u_iso, distance), patient_position)
    profile = _sample(dose_gy, grid, prof_pts)
    return FieldCurves(beam.name, depth, pdd, d_prof, off, profile, max_gy, dmax, float(entry))


def _isocentre(patient: Patient) -> tuple[float, float, float]:
    for p in patient.points:
        if p.label.upper() in ("ISO", "ISOCENTRE", "ISOCENTER"):
            return tuple(float(v) for v in p.position_mm_xyz)
    ext = patient.external
    idx = np.argwhere(ext.mask).mean(axis=0) if ext.mask.any() else (np.asarray(patient.grid.shape_zyx) - 1) / 2.0
    return tuple(float(v) for v in patient.grid.index_to_world(idx))


def open_field_display_session(patient: Patient, prescription_gy: float, case: dict, progress=None) -> Session:
    """A session for a phantom without a target: one anterior (gantry 0) open
    ``FIELD_SIZE_MM`` square field at the isocentre, scaled so the central-axis maximum is
    ``prescription_gy``. There is nothing to shape; the viewer shows the dose, the depth
    dose and a profile."""
    side = FIELD_SIZE_MM
    beam = Beam(f"open {side / 10:g}x{side / 10:g} cm G0", 0.0, isocentre_mm_xyz=_isocentre(patient))
    s = Session(patient, [beam], prescription_gy=prescription_gy, case=case, progress=progress)
    b = s.engine.geometry[0].beam
    field = b.fluence_grid.rectangle_mask((-side / 2, side / 2), (-side / 2, side / 2)).astype(np.float32)
    s.engine.set_fluences([field])
    curves = field_curves(s.dose(), patient.grid, b, patient.external.mask, patient_position=patient.patient_position)
    if curves is None or curves.max_gy <= 0:
        raise ValueError("the open field does not reach the phantom")
    s.engine.set_fluences([field * np.float32(prescription_gy / curves.max_gy)])
    s.initial_fluences = s.engine.fluences_host()
    return s
