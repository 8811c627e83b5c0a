"""Contour transfer (claims 9-11 of seed 003) and the limited-field-of-view merge (claim 4)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..model import Patient, Structure
from ._registration import Registration, RegistrationError
from ._sitk import fov_box_mm_xyz, fov_mask

__all__ = ["merge_limited_fov", "transfer_structures"]

AIR_HU = -1000.0


def _check(planning: Patient, new: Patient, registration: Registration, what: str) -> None:
    if not isinstance(registration, Registration):
        raise RegistrationError(f"{what}: registration must be a Registration")
    if registration.planning_grid != planning.grid:
        raise RegistrationError(f"{what}: the registration's planning grid ({registration.planning_grid.describe()}) "
                                f"is not the planning CT's ({planning.grid.describe()})")
    if registration.new_grid != new.grid:
        raise RegistrationError(f"{what}: the registration's new grid ({registration.new_grid.describe()}) "
                                f"is not the new CT's ({new.grid.describe()})")


def transfer_structures(planning: Patient, new: Patient, registration: Registration, *, names=None) -> Patient:
    """``new`` with the planning structures warped onto it through ``registration``.

    Each planning mask is resampled onto the new grid through the mapping (trilinear
    partial volume >= 0.5: a rigid "three-dimensional fusion of the contours" (claim 10)
    or, with a deformable registration, their elastic morphing (claim 11)). Names, kinds,
    colours and meta are kept; every transferred structure gets ``meta["transferred"] =
    registration.kind`` and ``meta["planning_volume_cc"]``, and replaces a structure of
    the same name already on ``new`` (others are kept). The patient's
    ``meta["transferred"]`` is ``registration.kind`` as well. The result is for review:
    the planner edits it like any structure set.

    Parameters
    ----------
    names : the structures to transfer (default all).
    """
    _check(planning, new, registration, "transfer_structures")
    chosen = planning.structures if names is None else tuple(planning.structure(n) for n in names)
    moved = []
    for s in chosen:
        mask = registration.warp_mask_to_new(s.mask)
        meta = {**s.meta, "transferred": registration.kind, "planning_volume_cc": round(s.volume_cc, 4)}
        moved.append(Structure(s.name, s.kind, mask, new.grid, s.colour, meta))
    names_moved = {s.name for s in moved}
    kept = tuple(s for s in new.structures if s.name not in names_moved)
    meta = {**new.meta, "transferred": registration.kind, "transferred_structures": [s.name for s in moved]}
    return replace(new, structures=kept + tuple(moved), meta=meta)


def merge_limited_fov(planning: Patient, new_fov: Patient, registration: Registration, *,
                      fov=None) -> Patient:
    """The new CT inside its limited field of view, the registered planning CT outside (claim 4).

    A CT taken before a fraction may cover only a region around the target; dose needs the
    whole patient, so outside that region the planning CT is carried over through the
    registration (planning -> new). Voxels that map outside the planning CT become air.

    Parameters
    ----------
    planning : the planning patient.
    new_fov : the new CT; its field of view is ``meta["fov_box_mm_xyz"]``
        (``((x0, x1), (y0, y1), (z0, z1))`` mm) unless ``fov`` is given.
    registration : planning -> new (usually :func:`register_rigid` on the limited view).
    fov : optional bool mask (z, y, x) on the new grid, True where the new CT is valid.

    Returns
    -------
    Patient
        on the new grid, ``new_fov``'s structures and points; ``meta["merged_fov"]`` records
        the box (or mask count), the registration kind and the voxel counts from each CT;
        ``meta["fov_box_mm_xyz"]`` is dropped (the merged CT covers the whole grid).
    """
    _check(planning, new_fov, registration, "merge_limited_fov")
    if fov is None:
        if fov_box_mm_xyz(new_fov) is None:
            raise RegistrationError(f"merge_limited_fov: {new_fov.name!r} has no limited field of view "
                                    "(meta['fov_box_mm_xyz']) and no fov mask was given")
        inside = fov_mask(new_fov)
    else:
        inside = np.asarray(fov, dtype=bool)
        if inside.shape != tuple(new_fov.grid.shape_zyx):
            raise RegistrationError(f"merge_limited_fov: fov mask shape {inside.shape} does not match the new grid "
                                    f"{tuple(new_fov.grid.shape_zyx)}")
    if not inside.any():
        raise RegistrationError("merge_limited_fov: the field of view holds no voxel of the new CT")
    carried = registration.warp_to_new(planning.ct_hu, order=1, fill=AIR_HU)
    ct = np.where(inside, new_fov.ct_hu, carried).astype(np.float32)
    meta = {k: v for k, v in new_fov.meta.items() if k != "fov_box_mm_xyz"}
    box = fov_box_mm_xyz(new_fov)
    meta["merged_fov"] = {
        "fov_box_mm_xyz": None if box is None else box.tolist(),
        "registration": registration.kind,
        "voxels_from_new": int(inside.sum()),
        "voxels_from_planning": int((~inside).sum()),
    }
    return replace(new_fov, ct_hu=ct, meta=meta)
