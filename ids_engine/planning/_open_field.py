"""Open fields shaped to a target's beam's-eye-view projection (the starting plan of the IDS paper)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ids_engine.model import Beam, Patient, Structure

__all__ = ["conformal_aperture", "equispaced_beams"]


def equispaced_beams(n: int, isocentre_mm_xyz, start_deg: float = 0.0, **beam_fields) -> list[Beam]:
    """``n`` coplanar beams at ``start + k * 360 / n`` degrees (IEC gantry), all at one isocentre."""
    if n < 1:
        raise ValueError("equispaced_beams: n must be >= 1")
    return [
        Beam(name=f"B{k + 1} G{(start_deg + k * 360.0 / n) % 360:g}", gantry_deg=start_deg + k * 360.0 / n,
             isocentre_mm_xyz=tuple(isocentre_mm_xyz), **beam_fields)
        for k in range(n)
    ]


def conformal_aperture(beam: Beam, patient: Patient, target: Structure, margin_mm: float = 5.0) -> np.ndarray:
    """Bool (nv, nu) on ``beam.fluence_grid``: amplitudes inside the target's BEV projection grown by ``margin_mm``.

    The projection is the set of fluence cells hit by target voxel centres (projected to the
    isocentre plane), closed by one cell and dilated by the margin (a disk in the plane).
    """
    fg = beam.fluence_grid
    if fg is None:
        raise ValueError(f"beam {beam.name!r} has no fluence grid (build the dose engine first)")
    if target.is_empty:
        raise ValueError(f"target {target.name!r} is empty")
    pts = target.grid.index_to_world(np.argwhere(target.mask))
    bev = beam.patient_to_bev(pts, patient.patient_position)
    rows, cols = fg.to_index(bev[:, 0], bev[:, 1])
    r = np.clip(np.rint(rows).astype(int), 0, fg.shape_vu[0] - 1)
    c = np.clip(np.rint(cols).astype(int), 0, fg.shape_vu[1] - 1)
    ap = np.zeros(fg.shape_vu, dtype=bool)
    ap[r, c] = True
    # Voxel centres project sparsely onto a fine fluence grid: close the gaps.
    gap = int(np.ceil(max(target.grid.spacing_mm_zyx) / fg.pitch_mm))
    ap = ndimage.binary_closing(ap, structure=np.ones((2 * gap + 1,) * 2, bool), iterations=1, border_value=0) | ap
    if margin_mm > 0:
        rad = margin_mm / fg.pitch_mm
        k = int(np.ceil(rad))
        yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
        ap = ndimage.binary_dilation(ap, structure=(yy**2 + xx**2) <= rad**2 + 1e-9)
    return ap
