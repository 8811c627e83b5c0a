"""The seed's beam's-eye-view (BEV) frame, beside ids-engine's IEC 61217 frames.

The forward-planning manual (seed 001) describes one Cartesian frame per beam:

    "The z axis is the central ray, positive toward the source of x-rays ... With the
    treatment machine pointed at the floor and the collimator unrotated, the x axis goes
    from left to right while standing in front of the treatment couch looking toward the
    gantry. The y axis is parallel to the long axis of the unrotated treatment couch and
    points toward the gantry. The origin is at isocenter ... The x and y axes rotate with
    the collimator."

Beside the frames of :mod:`ids_engine.model._beam` (all right-handed, mm):

==========================  ===============================================================
frame                       axes
==========================  ===============================================================
DICOM patient (x, y, z)     +x patient's left, +y posterior, +z superior
IEC patient support         HFS: +X_s patient's left, +Y_s superior, +Z_s anterior
IEC fixed                   support rotated by the couch angle about Z
IEC gantry                  fixed rotated by the gantry angle about Y_f; +Z_g to the source
IEC beam limiting device    gantry rotated by the collimator angle about Z_g
**seed BEV (x, y, z)**      **= IEC beam limiting device (X_b, Y_b, Z_b), origin at the
                            isocentre**
==========================  ===============================================================

Why they are the same frame: at gantry 0, couch 0, collimator 0 the IEC beam limiting
device frame equals the IEC fixed frame, whose +X_f points to the right of an observer at
the foot of the couch facing the gantry (the seed's x), +Y_f from the isocentre towards the
gantry along the couch's long axis (the seed's y) and +Z_f up, towards the source of a beam
pointed at the floor (the seed's z). The gantry turns Z_b with the central ray (the seed's z
"lies coincident with the central ray"), the collimator turns X_b and Y_b about it (the
seed's "x and y axes rotate with the collimator") and the couch turns the patient under a
room-fixed gantry (the seed's y follows "the unrotated couch"). For a head-first supine
patient at all angles 0, seed x = patient's left (DICOM +x), y = superior (+z), z = anterior
(-y).

The seed's BEV is a 3-D Cartesian frame. The *projected* BEV coordinates the dose engine and
the MLC use (:class:`~ids_engine.model.FluenceGrid`, :class:`~ids_engine.model.MLC`) are the
seed's x and y scaled to the isocentre plane along the diverging ray from the source:
``u = x * SAD / (SAD - z)``, ``v = y * SAD / (SAD - z)``, at distance ``SAD - z`` from the
source along the central axis (:meth:`Beam.patient_to_bev`). A point entered in a beam's
BEV coordinates (the seed's "Add Point In BEV") is converted once to patient coordinates
with :func:`seed_bev_to_patient` and is not moved when the beam later moves
(:func:`ids_engine.evaluation.add_point_in_bev` adds it to a patient).
"""

from __future__ import annotations

import numpy as np

from ._beam import Beam

__all__ = ["patient_to_seed_bev", "seed_bev_to_isocentre_plane", "seed_bev_to_patient"]


def patient_to_seed_bev(beam: Beam, points_xyz, patient_position: str = "HFS") -> np.ndarray:
    """DICOM patient points (..., 3), mm, to the seed's BEV coordinates (x, y, z) of ``beam``
    (origin at the isocentre, z towards the source, x and y turning with the collimator)."""
    return beam.patient_to_beam(points_xyz, patient_position)


def seed_bev_to_patient(beam: Beam, points_bev, patient_position: str = "HFS") -> np.ndarray:
    """The seed's BEV coordinates (..., 3) of ``beam`` to DICOM patient points (..., 3), mm."""
    p = np.asarray(points_bev, dtype=np.float64)
    if p.shape[-1] != 3:
        raise ValueError(f"BEV points need a last axis of length 3 (x, y, z), got shape {p.shape}")
    return beam.beam_to_patient(p, patient_position)


def seed_bev_to_isocentre_plane(points_bev, sad_mm: float) -> np.ndarray:
    """The seed's BEV (x, y, z) (..., 3) to the projected (u, v, distance) (..., 3) of the
    fluence grid and the MLC: x and y scaled to the isocentre plane along the ray from the
    source, and the distance ``SAD - z`` from the source along the central axis."""
    p = np.asarray(points_bev, dtype=np.float64)
    dist = sad_mm - p[..., 2]
    if np.any(dist <= 0):
        raise ValueError("a BEV point at or behind the source (z >= SAD) has no projection")
    scale = sad_mm / dist
    return np.stack([p[..., 0] * scale, p[..., 1] * scale, dist], axis=-1)

