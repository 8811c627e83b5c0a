"""Make Conformed Beams: static MLC beams on an arc, each conformed to a target's projection.

What the seed's tool does, and how it is done here
--------------------------------------------------
For every gantry angle of the arc (:func:`~ids_engine.planning.arc_angles`: start,
direction, length, increment; a full circle does not repeat its start):

1. **Volumes with margins.** The target is grown by its margin *in 3-D*
   (:func:`~ids_engine.model.expand`) and then projected; each volume to subtract likewise
   with its own margin. The margin is therefore the volume's, not the projection's: it is
   magnified with the volume (a margin m on a volume at distance d from the source spans
   ``m * SAD / d`` at the isocentre plane) and a volume grows along the beam too (slice by
   slice 2-D margins would not grow it head to foot). Under a parallel projection a 3-D
   margin and a 2-D margin of the projection would coincide (a Minkowski sum commutes with a
   linear projection); it is the divergence and the through-plane growth that differ.
2. **Projection.** A volume's projection is the set of rays from the source that cross it,
   sampled on a square raster of ``pitch_mm`` (default 0.5 mm) in the beam-limiting-device
   plane at the isocentre (:class:`BEVProjection`; cell centres at ``(k + 1/2) * pitch``).
   A ray belongs when it passes through a voxel of the structure, voxels taken as boxes
   around their centres (marched at half the smallest voxel spacing).
3. **Subtraction and pieces.** The projections of the volumes to subtract are removed from
   the target's; the rest falls into connected pieces (8-connected cells), and each piece
   whose area (margins included) reaches ``min_area_mm2`` - and is never zero - becomes a
   beam of its own. The minimum area is judged per piece.
4. **Leaves.** Each leaf pair of the machine's MLC (``machine.mlc`` or
   :func:`~ids_engine.model.default_mlc`; leaves along X_b, pairs stacked along Y_b) opens
   one interval, by the leaf mode:

   * ``"centre"`` - the leaf tips touch the projection on the pair's centre line: the
     opening spans the piece's cells on the raster rows next to the centre line;
   * ``"outside"`` - the whole leaf edge lies outside the projection (the aperture covers
     it): the opening spans the piece's cells on every raster row the pair covers;
   * ``"inside"`` - the whole leaf edge lies inside the projection: the opening is the
     longest run of columns in which every row the pair covers lies in the piece.

   So the apertures nest, inside ⊂ centre ⊂ outside. One aperture cannot shield a hole: a
   subtracted volume projecting wholly inside the target leaves one ring-shaped piece, whose
   leaves span the hole in the centre and outside modes (the inside mode keeps the longest
   run on one side of it). A pair with no opening is closed
   (parked at the middle of the X jaws). The X and Y jaws are fitted to the open leaves;
   everything is clipped to the MLC's maximum field.
5. **Collimator angle.** With ``optimise_collimator`` the angles ``lo, lo + inc, ...`` of
   ``collimator_range_deg`` (default [0, 180): a collimator turned by 180 degrees puts its
   leaves along the same lines) are tried, and the angle whose aperture differs least from the
   piece's projection is kept: the criterion is the area of the symmetric difference, the
   aperture's area outside the projection plus the projection's area the leaves shield
   (on the raster, mm^2; the first angle wins a tie). Otherwise every beam has
   ``collimator_deg``. The piece's projection is resampled (nearest cell) to each angle's
   frame, which moves its edges by at most ``pitch / sqrt(2)``.

The apertures become fluence maps on each beam's fluence grid with
:func:`conformed_fluences` (:func:`ids_engine.deliver.aperture_fluence`: open area fraction
of each cell plus leaf transmission), so the dose engine computes their dose like any other
fluence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from ids_engine.deliver import Aperture, aperture_fluence
from ids_engine.model import MLC, Beam, Patient, PhotonMachine, Structure, default_mlc, expand

from ._arcs import arc_angles
from ._beams import unique_name

__all__ = ["BEVProjection", "ConformedBeam", "LEAF_MODES", "aperture_area_mm2", "conformed_fluences", "fit_aperture",
           "make_conformed_beams", "project_structure"]

LEAF_MODES = ("centre", "outside", "inside")
_EPS = 1e-9
_RAY_CHUNK = 2_000_000  # ray samples per chunk of the projection


# ------------------------------------------------------------------ projection raster
@dataclass(frozen=True, eq=False)
class BEVProjection:
    """A binary raster in a beam's BEV at the isocentre plane (IEC beam limiting device X_b,
    Y_b projected along the rays from the source).

    mask : (nv, nu) bool, rows along v (Y_b), columns along u (X_b).
    pitch_mm : cell size.
    origin_mm_uv : (u, v) of the centre of cell [0, 0]; centres lie at ``(k + 1/2) * pitch``.
    """

    mask: np.ndarray
    pitch_mm: float
    origin_mm_uv: tuple[float, float]

    @property
    def area_mm2(self) -> float:
        return float(np.count_nonzero(self.mask)) * self.pitch_mm**2

    def u_mm(self) -> np.ndarray:
        return self.origin_mm_uv[0] + self.pitch_mm * np.arange(self.mask.shape[1])

    def v_mm(self) -> np.ndarray:
        return self.origin_mm_uv[1] + self.pitch_mm * np.arange(self.mask.shape[0])

    def extent_mm(self) -> tuple[float, float, float, float]:
        """(u_min, u_max, v_min, v_max) of the raster's cell edges (for pictures)."""
        p = self.pitch_mm
        u, v = self.u_mm(), self.v_mm()
        return (u[0] - p / 2, u[-1] + p / 2, v[0] - p / 2, v[-1] + p / 2)

    def cell_index(self) -> tuple[int, int]:
        """Lattice index (column, row) of cell [0, 0] (centre ``(index + 1/2) * pitch``)."""
        p = self.pitch_mm
        return int(round(self.origin_mm_uv[0] / p - 0.5)), int(round(self.origin_mm_uv[1] / p - 0.5))

    def on_lattice(self, i0: int, j0: int, nu: int, nv: int) -> "BEVProjection":
        """This raster copied onto the lattice window whose cell [0, 0] has index (i0, j0)."""
        ci, cj = self.cell_index()
        out = np.zeros((nv, nu), dtype=bool)
        r0, c0 = cj - j0, ci - i0
        rs = slice(max(r0, 0), min(r0 + self.mask.shape[0], nv))
        cs = slice(max(c0, 0), min(c0 + self.mask.shape[1], nu))
        if rs.start < rs.stop and cs.start < cs.stop:
            out[rs, cs] = self.mask[rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0]
        p = self.pitch_mm
        return BEVProjection(out, p, ((i0 + 0.5) * p, (j0 + 0.5) * p))


def _lattice_range(lo: float, hi: float, pitch: float) -> tuple[int, int]:
    """First and last lattice index whose cell (centre ``(k + 1/2) p``) meets [lo, hi]."""
    return int(np.floor(lo / pitch)), int(np.ceil(hi / pitch)) - 1


def _cast(mask: np.ndarray, grid, beam: Beam, position: str, pitch: float, window, cells=None) -> np.ndarray:
    """(nv, nu) bool: which rays of the lattice ``window`` = (i0, j0, nu, nv) cross ``mask``
    (only the cells of ``cells`` are cast when given)."""
    i0, j0, nu, nv = window
    out = np.zeros((nv, nu), dtype=bool)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return out
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    # Crop (z, y, x) with one empty voxel around, so rounding never leaves the array.
    lo_p, hi_p = lo - 1, hi + 1
    crop = np.zeros(tuple(hi_p - lo_p + 1), dtype=bool)
    crop[1:-1, 1:-1, 1:-1] = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    # Distance range along the central axis: the corners of the voxel boxes' bounding box.
    corners_idx = np.array([[a, b, c] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5)
                            for c in (lo[2] - 0.5, hi[2] + 0.5)])
    bev = beam.patient_to_bev(grid.index_to_world(corners_idx), position)
    dmin, dmax = bev[:, 2].min(), bev[:, 2].max()
    step = min(grid.spacing_mm_zyx) / 2.0
    d = np.arange(dmin, dmax + step, step)
    # Beam coordinates of a ray sample: d * (u/SAD, v/SAD, -1) + (0, 0, SAD); patient = b @ R + iso;
    # crop index (x, y, z order) = (patient - origin) / spacing - crop offset.
    sad = beam.sad_mm
    R = beam.rotation(position)
    sp_xyz = np.asarray(grid.spacing_mm_xyz)
    M = R / sp_xyz[None, :]
    c0 = (np.array([0.0, 0.0, sad]) @ M + (np.asarray(beam.isocentre_mm_xyz) - np.asarray(grid.origin_mm_xyz)) / sp_xyz
          - lo_p[::-1])
    shape_xyz = np.asarray(crop.shape[::-1])
    rows, cols = (np.nonzero(cells) if cells is not None else np.indices((nv, nu)).reshape(2, -1))
    if rows.size == 0:
        return out
    u = (i0 + cols + 0.5) * pitch
    v = (j0 + rows + 0.5) * pitch
    a = np.stack([u / sad, v / sad, -np.ones_like(u)], axis=-1) @ M  # (n, 3) index change per mm of d
    hit = np.zeros(rows.size, dtype=bool)
    flat = crop.ravel()
    nx, ny, nz = (int(n) for n in shape_xyz)
    a32, d32, c32 = a.astype(np.float32), d.astype(np.float32), c0.astype(np.float32)
    chunk = max(1, _RAY_CHUNK // d.size)
    for s in range(0, rows.size, chunk):
        ac = a32[s : s + chunk]
        # Nearest voxel per axis; outside the crop (its empty border included) is a miss.
        ix = np.rint(np.multiply.outer(ac[:, 0], d32) + c32[0]).astype(np.int32)
        iy = np.rint(np.multiply.outer(ac[:, 1], d32) + c32[1]).astype(np.int32)
        iz = np.rint(np.multiply.outer(ac[:, 2], d32) + c32[2]).astype(np.int32)
        np.clip(ix, 0, nx - 1, out=ix)
        np.clip(iy, 0, ny - 1, out=iy)
        np.clip(iz, 0, nz - 1, out=iz)
        hit[s : s + chunk] = flat[(iz * ny + iy) * nx + ix].any(axis=1)
    out[rows, cols] = hit
    return out


def _window_of(mask: np.ndarray, grid, beam: Beam, position: str, pitch: float, pad_cells: int = 1):
    """The lattice window covering the projection of ``mask``'s voxel-box bounding box."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    bev = beam.patient_to_bev(grid.index_to_world(corners), position)
    i0, i1 = _lattice_range(bev[:, 0].min(), bev[:, 0].max(), pitch)
    j0, j1 = _lattice_range(bev[:, 1].min(), bev[:, 1].max(), pitch)
    i0, j0, i1, j1 = i0 - pad_cells, j0 - pad_cells, i1 + pad_cells, j1 + pad_cells
    return i0, j0, i1 - i0 + 1, j1 - j0 + 1


def project_structure(structure: Structure, beam: Beam, patient_position: str = "HFS", pitch_mm: float = 0.5,
                      window=None) -> BEVProjection:
    """The projection of a structure (voxels as boxes) in ``beam``'s BEV at the isocentre plane
    (its collimator angle included), on a ``pitch_mm`` raster. ``window`` = (i0, j0, nu, nv)
    fixes the raster's lattice window (default: the projection's bounding box plus a cell)."""
    pitch = float(pitch_mm)
    if not pitch > 0:
        raise ValueError(f"pitch_mm must be positive, got {pitch_mm!r}")
    if structure.is_empty:
        if window is None:
            return BEVProjection(np.zeros((1, 1), dtype=bool), pitch, (0.5 * pitch, 0.5 * pitch))
    if window is None:
        window = _window_of(structure.mask, structure.grid, beam, patient_position, pitch)
    i0, j0, nu, nv = window
    m = _cast(structure.mask, structure.grid, beam, patient_position, pitch, window)
    return BEVProjection(m, pitch, ((i0 + 0.5) * pitch, (j0 + 0.5) * pitch))


def _rotate(proj: BEVProjection, angle_deg: float) -> BEVProjection:
    """``proj`` (in the frame of collimator c) resampled (nearest cell) in the frame of
    collimator c + angle: that frame's (u', v') = R_z(angle)^T (u, v)."""
    a = np.radians(angle_deg)
    ca, sa = np.cos(a), np.sin(a)
    if abs(angle_deg % 360.0) < 1e-12:
        return proj
    p = proj.pitch_mm
    rr, cc = np.nonzero(proj.mask)
    if rr.size == 0:
        return proj
    u = proj.origin_mm_uv[0] + p * cc
    v = proj.origin_mm_uv[1] + p * rr
    un, vn = ca * u + sa * v, -sa * u + ca * v
    i0, i1 = _lattice_range(un.min() - p, un.max() + p, p)
    j0, j1 = _lattice_range(vn.min() - p, vn.max() + p, p)
    nu, nv = i1 - i0 + 1, j1 - j0 + 1
    uu, vv = np.meshgrid((i0 + 0.5 + np.arange(nu)) * p, (j0 + 0.5 + np.arange(nv)) * p)
    us, vs = ca * uu - sa * vv, sa * uu + ca * vv  # back to the source frame
    ci = np.rint((us - proj.origin_mm_uv[0]) / p).astype(np.int64)
    ri = np.rint((vs - proj.origin_mm_uv[1]) / p).astype(np.int64)
    ok = (ci >= 0) & (ci < proj.mask.shape[1]) & (ri >= 0) & (ri < proj.mask.shape[0])
    out = np.zeros((nv, nu), dtype=bool)
    out[ok] = proj.mask[ri[ok], ci[ok]]
    return BEVProjection(out, p, ((i0 + 0.5) * p, (j0 + 0.5) * p))


# ------------------------------------------------------------------ leaves
def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True (the first on a tie), or None."""
    if not flags.any():
        return None
    d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, stops = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    k = int(np.argmax(stops - starts))
    return int(starts[k]), int(stops[k] - 1)


def fit_aperture(projection: BEVProjection, mlc: MLC, leaf_mode: str = "centre") -> tuple[Aperture | None, float, bool]:
    """Leaves and jaws conformed to a projection (in the MLC's own frame) by ``leaf_mode``
    (see the module's notes): (aperture or None when no pair opens, the mismatch criterion
    in mm^2 = area of the aperture outside the projection plus area of the projection the
    leaves shield, whether the aperture was clipped to the maximum field)."""
    if leaf_mode not in LEAF_MODES:
        raise ValueError(f"leaf_mode {leaf_mode!r} is not one of {', '.join(LEAF_MODES)}")
    p = projection.pitch_mm
    edges = mlc.leaf_boundaries_mm()
    # Extend the raster along v to whole leaf bands and by a cell along u, so every row a
    # pair covers is on it and the open area can be measured on it.
    ci, cj = projection.cell_index()
    nv0, nu0 = projection.mask.shape
    v_lo, v_hi = cj * p, (cj + nv0) * p
    touching = np.nonzero((edges[1:] > v_lo) & (edges[:-1] < v_hi))[0]
    if touching.size:
        v_lo, v_hi = min(v_lo, edges[touching[0]]), max(v_hi, edges[touching[-1] + 1])
    j0 = int(np.floor(v_lo / p + _EPS))
    j1 = int(np.ceil(v_hi / p - _EPS)) - 1
    proj = projection.on_lattice(ci - 1, j0, nu0 + 2, j1 - j0 + 1)
    M = proj.mask
    u = proj.u_mm()
    v = proj.v_mm()
    x1 = np.zeros(mlc.n_pairs)
    x2 = np.zeros(mlc.n_pairs)
    is_open = np.zeros(mlc.n_pairs, dtype=bool)
    row_pair = np.full(M.shape[0], -1, dtype=np.int64)
    for k in range(mlc.n_pairs):
        lo_e, hi_e = edges[k], edges[k + 1]
        band = (v - p / 2 < hi_e - _EPS) & (v + p / 2 > lo_e + _EPS)
        row_pair[band & ((v >= lo_e) & (v < hi_e))] = k
        if not band.any():
            continue
        rows = M[band]
        if leaf_mode == "outside":
            cols = np.nonzero(rows.any(axis=0))[0]
            span = (cols[0], cols[-1]) if cols.size else None
        elif leaf_mode == "centre":
            c = 0.5 * (lo_e + hi_e)
            near = np.abs(v - c) <= p / 2 + _EPS
            cols = np.nonzero(M[near].any(axis=0))[0] if near.any() else np.zeros(0, int)
            span = (cols[0], cols[-1]) if cols.size else None
        else:  # inside: every covered row in the piece; the pair must lie wholly on the raster
            full = (band.sum() * p) >= (hi_e - lo_e) - p / 2
            span = _longest_run(rows.all(axis=0)) if full else None
        if span is not None:
            x1[k], x2[k] = u[span[0]] - p / 2, u[span[1]] + p / 2
            is_open[k] = True
    if not is_open.any():
        return None, float(M.sum()) * p * p, False
    half_x, half_y = mlc.max_field_mm[0] / 2.0, mlc.max_field_mm[1] / 2.0
    rows_in = v[M.any(axis=1)]
    clipped = bool(np.any(x1[is_open] < -half_x) or np.any(x2[is_open] > half_x)
                   or rows_in.min() < edges[0] or rows_in.max() > edges[-1])
    x1 = np.clip(x1, -half_x, half_x)
    x2 = np.clip(x2, -half_x, half_x)
    jx = (float(x1[is_open].min()), float(x2[is_open].max()))
    ko = np.nonzero(is_open)[0]
    jy_lo, jy_hi = float(edges[ko[0]]), float(edges[ko[-1] + 1])
    clipped |= jy_lo < -half_y or jy_hi > half_y
    jy = (max(jy_lo, -half_y), min(jy_hi, half_y))
    park = 0.5 * (jx[0] + jx[1])
    x1[~is_open] = park
    x2[~is_open] = park
    ap = Aperture(x1, x2, jx, jy)
    # Mismatch on the raster: cells whose centre is open versus cells of the projection.
    k = row_pair
    open_cells = np.zeros_like(M)
    has = k >= 0
    kk = k[has]
    lo = np.maximum(x1[kk], jx[0])[:, None]
    hi = np.minimum(x2[kk], jx[1])[:, None]
    vin = ((v[has] >= jy[0]) & (v[has] <= jy[1]))[:, None]
    open_cells[has] = (u[None, :] >= lo) & (u[None, :] <= hi) & vin & is_open[kk][:, None]
    mismatch = float(np.count_nonzero(open_cells ^ M)) * p * p
    return ap, mismatch, clipped


def aperture_area_mm2(aperture: Aperture, mlc: MLC) -> float:
    """The open area of an aperture at the isocentre plane (leaves within the jaws), mm^2."""
    edges = mlc.leaf_boundaries_mm()
    jx, jy = aperture.jaw_x_mm, aperture.jaw_y_mm
    w = np.clip(np.minimum(edges[1:], jy[1]) - np.maximum(edges[:-1], jy[0]), 0.0, None)
    o = np.clip(np.minimum(aperture.leaf_x2_mm, jx[1]) - np.maximum(aperture.leaf_x1_mm, jx[0]), 0.0, None)
    return float(np.sum(w * o))


# ------------------------------------------------------------------ the tool
@dataclass(frozen=True, eq=False)
class ConformedBeam:
    """One beam made by :func:`make_conformed_beams`.

    beam : the static beam (no fluence grid: the dose engine chooses one).
    aperture : its MLC leaves and jaws (beam limiting device frame, isocentre plane).
    mlc : the MLC the aperture is for.
    projection : the piece of the target's projection (margins included, volumes to subtract
        removed) this beam conforms to, in the beam's frame.
    target_projection : the whole target's projection (with margin), in the beam's frame.
    avoid_projection : the union of the subtracted volumes' projections over the target's
        raster, in the beam's frame.
    piece, n_pieces : which piece of the projection at this gantry angle (0-based) and how many
        pieces there were (before the minimum-area test).
    mismatch_mm2 : the collimator criterion of the chosen angle.
    clipped : whether the aperture was clipped to the MLC's maximum field.
    """

    beam: Beam
    aperture: Aperture
    mlc: MLC
    projection: BEVProjection
    target_projection: BEVProjection
    avoid_projection: BEVProjection
    piece: int
    n_pieces: int
    mismatch_mm2: float
    clipped: bool = False

    @property
    def area_mm2(self) -> float:
        """The piece's projected area at the isocentre plane (margins included), mm^2."""
        return self.projection.area_mm2

    @property
    def aperture_area_mm2(self) -> float:
        return aperture_area_mm2(self.aperture, self.mlc)

    def to_dict(self) -> dict:
        """Plain JSON: the beam's settings, its aperture and areas."""
        b = self.beam
        return {
            "name": b.name, "gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg, "collimator_deg": b.collimator_deg,
            "isocentre_mm_xyz": list(b.isocentre_mm_xyz), "sad_mm": b.sad_mm, "energy_mv": b.energy_mv,
            "mlc": self.mlc.name, "leaf_x1_mm": [round(float(x), 3) for x in self.aperture.leaf_x1_mm],
            "leaf_x2_mm": [round(float(x), 3) for x in self.aperture.leaf_x2_mm],
            "jaw_x_mm": list(self.aperture.jaw_x_mm), "jaw_y_mm": list(self.aperture.jaw_y_mm),
            "projected_area_mm2": round(self.area_mm2, 2), "aperture_area_mm2": round(self.aperture_area_mm2, 2),
            "mismatch_mm2": round(self.mismatch_mm2, 2), "piece": self.piece + 1, "pieces": self.n_pieces,
            "clipped_to_max_field": self.clipped,
        }


def _resolve(patient: Patient, s: "Structure | str") -> Structure:
    if isinstance(s, Structure):
        return s
    return patient.structure(str(s))


def _avoid_list(patient: Patient, avoid) -> list[tuple[Structure, float]]:
    """``avoid`` as (structure, margin) pairs: a mapping name -> margin, or items that are a
    structure/name or a (structure/name, margin) pair."""
    if avoid is None:
        return []
    items = avoid.items() if isinstance(avoid, dict) else avoid
    out = []
    for it in items:
        if isinstance(it, (Structure, str)):
            s, m = it, 0.0
        else:
            s, m = it
        m = float(m)
        if not np.isfinite(m) or m < 0:
            raise ValueError(f"the margin of a volume to subtract must be a number >= 0 mm, got {m!r}")
        out.append((_resolve(patient, s), m))
    return out


def make_conformed_beams(
    patient: Patient,
    target: "Structure | str",
    *,
    target_margin_mm: float = 0.0,
    avoid: "Iterable | dict | None" = None,
    start_deg: float = 0.0,
    length_deg: float = 360.0,
    increment_deg: float = 40.0,
    direction: str = "CW",
    isocentre_mm_xyz=None,
    couch_deg: float = 0.0,
    collimator_deg: float = 0.0,
    leaf_mode: str = "centre",
    optimise_collimator: bool = False,
    collimator_increment_deg: float = 5.0,
    collimator_range_deg: tuple[float, float] = (0.0, 180.0),
    min_area_mm2: float = 0.0,
    machine: PhotonMachine | None = None,
    mlc: MLC | None = None,
    energy_mv: float | None = None,
    sad_mm: float | None = None,
    existing: Sequence[Beam] = (),
    name_prefix: str = "CF",
    pitch_mm: float = 0.5,
) -> list[ConformedBeam]:
    """The seed's "Make Conformed Beams" (see the module's notes).

    Parameters
    ----------
    patient : the patient (structures by name, patient position).
    target : the target structure (or its name); ``target_margin_mm`` its 3-D margin.
    avoid : volumes whose projections are subtracted, each with its own 3-D margin: a mapping
        name -> margin, or a list of names/structures or (name/structure, margin) pairs.
    start_deg, length_deg, increment_deg, direction : the arc (:func:`arc_angles`).
    isocentre_mm_xyz : default the target's centroid (without margin).
    couch_deg, collimator_deg : of every beam (the collimator angle is ignored when
        ``optimise_collimator``).
    leaf_mode : "centre", "outside" or "inside".
    optimise_collimator, collimator_increment_deg, collimator_range_deg : the collimator
        search ([lo, hi) in steps of the increment).
    min_area_mm2 : a piece of projection smaller than this (at the isocentre plane, margins
        included) makes no beam; an empty one never does. Nor does a piece on which no leaf
        pair opens (in "inside" mode, a piece narrower than every leaf it crosses).
    machine, mlc : the MLC is ``mlc``, else ``machine.mlc``, else :func:`default_mlc`.
        ``energy_mv`` and ``sad_mm`` default to the machine's (6 MV, 1000 mm without one).
    existing : beams already in the plan (the new names are unique among them).
    name_prefix : beams are named ``<prefix> G<gantry>`` (with ``a``, ``b``, ... per piece).
    pitch_mm : the projection raster's cell size.

    Returns the beams in arc order (pieces of one angle together).
    """
    if leaf_mode not in LEAF_MODES:
        raise ValueError(f"leaf_mode {leaf_mode!r} is not one of {', '.join(LEAF_MODES)}")
    if not (np.isfinite(min_area_mm2) and min_area_mm2 >= 0):
        raise ValueError(f"min_area_mm2 must be >= 0, got {min_area_mm2!r}")
    tm = float(target_margin_mm)
    if not (np.isfinite(tm) and tm >= 0):
        raise ValueError(f"target_margin_mm must be >= 0, got {target_margin_mm!r}")
    tgt = _resolve(patient, target)
    if tgt.is_empty:
        raise ValueError(f"target {tgt.name!r} is empty")
    avoid_list = _avoid_list(patient, avoid)
    for s, _ in avoid_list:
        if s.name == tgt.name:
            raise ValueError(f"{s.name!r} is the target: subtracting its own projection leaves nothing")
    angles = arc_angles(start_deg, length_deg, increment_deg, direction)
    if optimise_collimator:
        inc = float(collimator_increment_deg)
        lo, hi = (float(v) for v in collimator_range_deg)
        if not (np.isfinite(inc) and inc > 0):
            raise ValueError(f"collimator_increment_deg must be positive, got {collimator_increment_deg!r}")
        if not hi > lo:
            raise ValueError(f"collimator_range_deg must be (lo, hi) with hi > lo, got {collimator_range_deg!r}")
        candidates = lo + inc * np.arange(int(np.ceil((hi - lo) / inc - _EPS)))
    else:
        candidates = np.array([float(collimator_deg)])
    mlc = mlc or (machine.mlc if machine is not None else None) or default_mlc()
    energy = float(energy_mv if energy_mv is not None else (machine.energy_mv if machine is not None else 6.0))
    sad = float(sad_mm if sad_mm is not None else (machine.sad_mm if machine is not None else 1000.0))
    iso = tuple(float(v) for v in (isocentre_mm_xyz if isocentre_mm_xyz is not None else tgt.centroid_xyz()))
    pos = patient.patient_position
    T = expand(tgt.name, tgt, tm) if tm > 0 else tgt
    A = [expand(s.name, s, m) if m > 0 else s for s, m in avoid_list]
    A = [a for a in A if not a.is_empty]
    # Cast in the frame of the first candidate angle; other candidates are resampled from it.
    c_ref = float(candidates[0])
    taken = list(existing)
    out: list[ConformedBeam] = []
    for g in angles:
        ref = Beam("ref", gantry_deg=float(g), couch_deg=couch_deg, collimator_deg=c_ref, isocentre_mm_xyz=iso,
                   sad_mm=sad, energy_mv=energy)
        window = _window_of(T.mask, T.grid, ref, pos, pitch_mm)
        tproj = project_structure(T, ref, pos, pitch_mm, window)
        amask = np.zeros_like(tproj.mask)
        for a in A:
            amask |= _cast(a.mask, a.grid, ref, pos, pitch_mm, window)
        aproj = BEVProjection(amask, tproj.pitch_mm, tproj.origin_mm_uv)
        rest = tproj.mask & ~amask
        labels, n = ndimage.label(rest, structure=np.ones((3, 3), dtype=bool))
        kept = []
        for k in range(1, n + 1):
            piece = BEVProjection(labels == k, tproj.pitch_mm, tproj.origin_mm_uv)
            if piece.area_mm2 > 0 and piece.area_mm2 >= min_area_mm2:
                kept.append((k - 1, piece))
        for idx, (k, piece) in enumerate(kept):
            best = None
            for c in candidates:
                rp = _rotate(piece, float(c) - c_ref)
                ap, mismatch, clipped = fit_aperture(rp, mlc, leaf_mode)
                if ap is None:
                    continue
                if best is None or mismatch < best[2] - 1e-9:
                    best = (float(c), ap, mismatch, clipped, rp)
            if best is None:
                continue  # no leaf pair opens (a piece thinner than the inside mode allows)
            c, ap, mismatch, clipped, rp = best
            label = f"{name_prefix} G{g:g}" + (f" {chr(ord('a') + idx)}" if len(kept) > 1 else "")
            beam = replace(ref, name=unique_name(label, taken), collimator_deg=c)
            taken.append(beam)
            out.append(ConformedBeam(beam, ap, mlc, rp, _rotate(tproj, c - c_ref), _rotate(aproj, c - c_ref), k, n,
                                     mismatch, clipped))
    return out


def conformed_fluences(conformed: Sequence[ConformedBeam], beams: Sequence[Beam], mu=1.0) -> list[np.ndarray]:
    """Fluence maps (float32 (nv, nu), MU) of conformed beams' apertures on the fluence grids
    of ``beams`` (the dose engine's beams in the same order, e.g. ``engine.beams``), for
    ``DoseEngine.set_fluences``. ``mu``: one number or one per beam."""
    if len(conformed) != len(beams):
        raise ValueError(f"{len(conformed)} conformed beams but {len(beams)} engine beams")
    mus = np.broadcast_to(np.asarray(mu, dtype=np.float64), (len(beams),))
    out = []
    for cb, b, m in zip(conformed, beams, mus):
        if b.fluence_grid is None:
            raise ValueError(f"beam {b.name!r} has no fluence grid (take the beams from the dose engine)")
        if (b.gantry_deg, b.couch_deg, b.collimator_deg) != (cb.beam.gantry_deg, cb.beam.couch_deg, cb.beam.collimator_deg):
            raise ValueError(f"beam {b.name!r} does not have the angles of conformed beam {cb.beam.name!r}")
        out.append((aperture_fluence(cb.aperture, cb.mlc, b.fluence_grid) * np.float32(m)).astype(np.float32))
    return out
