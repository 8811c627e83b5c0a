"""Beam operations of the seed's Beams menu, on lists of :class:`~ids_engine.model.Beam`.

* :func:`new_beam` - a new beam starting at the isocentre of the plan's prior (last) beam;
* :func:`copy_beam` - a beam with the isocentre and angles of an existing one;
* :func:`parallel_opposed` - the beam opposing an existing one;
* :func:`move_isocentres` - every beam moved to one beam's isocentre.

Beams are frozen; these functions return new beams (or a new list) and never change their
input. A beam is named by its index in the list or by its name. Every beam made here gets a
name not yet used in the list (:func:`unique_name`).

Parallel-opposed convention
---------------------------
The opposing beam has gantry ``g + 180``, the same couch angle and the collimator mirrored,
``(360 - c) mod 360``, as a treatment machine is set: seen from the opposite side the
collimator's rotation runs the other way, so ``-c`` puts its jaws and leaves along the same
lines in the room. Then (for any couch angle) the opposing beam's X_b is the original's -X_b
and its Y_b is the original's Y_b: the field is mirrored in x (the leaf banks swap,
``x1' = -x2``, ``x2' = -x1``, the X jaws likewise) and the same in y, and its projection
covers the same region of the patient (:func:`mirror_aperture`, :func:`mirror_fluence`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from ids_engine.model import Beam, FluenceGrid

__all__ = ["copy_beam", "find_beam", "mirror_aperture", "mirror_fluence", "mirror_fluence_grid", "move_isocentres",
           "new_beam", "parallel_opposed", "unique_name"]


def unique_name(name: str, taken) -> str:
    """``name`` if no beam in ``taken`` (names, or beams) has it, else ``name (2)``, ``name (3)``, ..."""
    names = {b.name if isinstance(b, Beam) else str(b) for b in taken}
    name = str(name).strip() or "beam"
    if name not in names:
        return name
    m = re.fullmatch(r"(.*) \((\d+)\)", name)
    stem, k = (m.group(1), int(m.group(2))) if m else (name, 1)
    while True:
        k += 1
        candidate = f"{stem} ({k})"
        if candidate not in names:
            return candidate


def find_beam(beams: Sequence[Beam], which: "int | str") -> int:
    """The index of a beam given by index (negative counts from the end) or by name."""
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        i = int(which)
        if not -len(beams) <= i < len(beams):
            raise ValueError(f"beam index {i} out of range: the plan has {len(beams)} beam(s)")
        return i % len(beams)
    names = [b.name for b in beams]
    if which not in names:
        raise ValueError(f"no beam named {which!r}; beams: {', '.join(names) or '(none)'}")
    return names.index(which)


def new_beam(beams: Sequence[Beam], name: str | None = None, *, isocentre_mm_xyz=None, **fields) -> Beam:
    """A new beam for a plan whose beams are ``beams``.

    It starts at the isocentre of the prior beam (the last of ``beams``), as the seed's Beams
    menu does; the first beam of a plan starts at ``isocentre_mm_xyz`` (default the origin).
    Passing ``isocentre_mm_xyz`` for a later beam is refused (the isocentre comes from the
    prior beam; move it afterwards). Other fields (angles, energy, SAD) are keywords of
    :class:`Beam`. The name defaults to ``Beam <n>``, made unique in the plan.
    """
    if beams:
        if isocentre_mm_xyz is not None:
            raise ValueError("new_beam: a new beam takes the isocentre of the plan's prior beam; "
                             "give isocentre_mm_xyz only for the first beam (or move the beam afterwards)")
        iso = beams[-1].isocentre_mm_xyz
    else:
        iso = (0.0, 0.0, 0.0) if isocentre_mm_xyz is None else tuple(isocentre_mm_xyz)
    name = unique_name(name if name is not None else f"Beam {len(beams) + 1}", beams)
    return Beam(name=name, isocentre_mm_xyz=iso, **fields)


def copy_beam(beams: Sequence[Beam], which: "int | str", name: str | None = None) -> Beam:
    """A new beam with the isocentre, angles and every other setting of an existing beam,
    under a name unique in the plan (default ``<name> copy``)."""
    src = beams[find_beam(beams, which)]
    return replace(src, name=unique_name(name if name is not None else f"{src.name} copy", beams))


def mirror_fluence_grid(grid: FluenceGrid | None) -> FluenceGrid | None:
    """The fluence grid mirrored in u (X_b): the grid of the parallel-opposed beam, covering
    the same cells of the room."""
    if grid is None:
        return None
    nu = grid.shape_vu[1]
    u_last = grid.origin_mm_uv[0] + (nu - 1) * grid.pitch_mm
    return FluenceGrid(grid.shape_vu, grid.pitch_mm, (-u_last, grid.origin_mm_uv[1]))


def mirror_fluence(fluence) -> np.ndarray:
    """A fluence (nv, nu) on a grid, mirrored for the parallel-opposed beam's
    :func:`mirror_fluence_grid` (columns reversed)."""
    return np.ascontiguousarray(np.asarray(fluence)[:, ::-1])


def mirror_aperture(aperture):
    """An :class:`~ids_engine.deliver.Aperture` mirrored in X_b for the parallel-opposed beam:
    the leaf banks swap (``x1' = -x2``, ``x2' = -x1``), the X jaws likewise, Y unchanged."""
    from ids_engine.deliver import Aperture

    return Aperture(-np.asarray(aperture.leaf_x2_mm), -np.asarray(aperture.leaf_x1_mm),
                    (-aperture.jaw_x_mm[1], -aperture.jaw_x_mm[0]), aperture.jaw_y_mm)


def mirror_field(f):
    """A :class:`~ids_engine.planning.BeamField` for the parallel-opposed beam covering the
    same region of the room (mirrored in X_b: aperture, fluence map or open jaws)."""
    from ._plan import BeamField

    if f.aperture is not None:
        return BeamField(f.jaw_x_mm, f.jaw_y_mm, aperture=mirror_aperture(f.aperture))
    if f.fluence_per_mu is not None:
        return BeamField(f.jaw_x_mm, f.jaw_y_mm, fluence_per_mu=mirror_fluence(f.fluence_per_mu))
    return BeamField((-f.jaw_x_mm[1], -f.jaw_x_mm[0]), f.jaw_y_mm)


def parallel_opposed(beams: Sequence[Beam], which: "int | str", name: str | None = None) -> Beam:
    """The beam parallel-opposed to an existing beam: gantry + 180, same couch and isocentre,
    collimator mirrored to ``(360 - c) mod 360`` (see the module's note), the fluence grid
    mirrored in u. Name default ``<name> opp``, made unique in the plan.

    Its fluence for the same field in the room is :func:`mirror_fluence` of the original's
    (an MLC aperture: :func:`mirror_aperture`).
    """
    src = beams[find_beam(beams, which)]
    return replace(src, name=unique_name(name if name is not None else f"{src.name} opp", beams),
                   gantry_deg=(src.gantry_deg + 180.0) % 360.0,
                   collimator_deg=(360.0 - src.collimator_deg) % 360.0,
                   fluence_grid=mirror_fluence_grid(src.fluence_grid))


def move_isocentres(beams: Sequence[Beam], which: "int | str") -> list[Beam]:
    """Every beam moved to the isocentre of one beam. Angles are kept; a moved beam's fluence
    grid is reset to None (the dose engine chooses one covering the body's projection from
    the new isocentre), as its fluence, if any, no longer covers the same part of the patient."""
    iso = beams[find_beam(beams, which)].isocentre_mm_xyz
    return [b if b.isocentre_mm_xyz == iso else replace(b, isocentre_mm_xyz=iso, fluence_grid=None) for b in beams]
