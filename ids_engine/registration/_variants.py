"""Test cases with known transforms: a planning CT moved, rotated and deformed into a "new CT".

A :class:`Variant` holds the planning patient (the input with fiducial markers and, for the
uniform-water phantoms, some tissue contrast added), the new CT made from it through a
known :class:`Registration` (``truth``), the true structures on the new CT, and the marker
positions in both CTs. Registrations are checked against ``truth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from ..model import Grid, Patient, Structure, StructureKind
from ._registration import Registration, RegistrationError, invert_displacement, rotation_matrix, sample_field

__all__ = ["Variant", "make_variant", "variant_from_spec"]

MARKER_HU = 2500.0  # gold seeds saturate a kV CT
MARKER_RADIUS_MM = 1.5
AIR_HU = -1000.0
# Added to uniform phantoms (water everywhere in the body) so that intensity registration
# sees the anatomy, as it does in a patient's CT.
TARGET_CONTRAST_HU = 30.0
OAR_CONTRAST_HU = 60.0
TEXTURE_HU = 15.0
TEXTURE_SIGMA_MM = 5.0
DEFORMATION_SIGMA_MM = 8.0


@dataclass(frozen=True, eq=False)
class Variant:
    """A new CT made from a planning CT through a known mapping.

    Attributes
    ----------
    planning : the planning patient actually used (input plus markers / contrast).
    patient : the new CT with its true structures (on ``truth.new_grid``).
    truth : the known planning -> new :class:`Registration`.
    fiducials_planning_xyz, fiducials_new_xyz : marker label -> (x, y, z) mm in each CT.
    spec : the parameters it was made with, and realised figures (volume changes).
    """

    planning: Patient
    patient: Patient
    truth: Registration
    fiducials_planning_xyz: dict = field(default_factory=dict)
    fiducials_new_xyz: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)


def _triple(value, name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        a = np.repeat(a, 3)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise RegistrationError(f"make_variant: {name} must be three finite numbers (x, y, z), got {value!r}")
    return a


def _smoothed(mask: np.ndarray, grid: Grid, sigma_mm: float) -> np.ndarray:
    sig = [sigma_mm / s for s in grid.spacing_mm_zyx]
    return ndimage.gaussian_filter(mask.astype(np.float64), sig, mode="constant")


def deformation_field(planning: Patient, oar_grow_mm: float, target_shrink_mm: float,
                      sigma_mm: float = DEFORMATION_SIGMA_MM) -> np.ndarray:
    """A smooth displacement ``w`` (float64 (nz, ny, nx, 3), mm) on the planning grid.

    ``x -> x + w(x)`` grows every OAR and shrinks every target: ``w = sigma*sqrt(2 pi) *
    (s grad(G*T) - g grad(G*O))`` with ``G`` a Gaussian of ``sigma_mm`` and ``T``, ``O`` the
    target and OAR indicators; at a flat boundary the displacement is exactly ``s`` (``g``)
    along the normal, and it fades over a few sigma. The Jacobian stays positive while
    ``max(s, g) < sigma * sqrt(e)``.
    """
    g = planning.grid
    w = np.zeros(tuple(g.shape_zyx) + (3,))
    k = sigma_mm * math.sqrt(2.0 * math.pi)
    for kind, amount in ((StructureKind.TARGET, target_shrink_mm), (StructureKind.OAR, -oar_grow_mm)):
        if amount == 0:
            continue
        mask = planning.kind_mask(kind)
        if not mask.any():
            raise RegistrationError(f"make_variant: the patient has no {kind.value} structure to deform")
        grads = np.gradient(_smoothed(mask, g, sigma_mm), *g.spacing_mm_zyx)  # d/dz, d/dy, d/dx
        w[..., 0] += k * amount * grads[2]
        w[..., 1] += k * amount * grads[1]
        w[..., 2] += k * amount * grads[0]
    return w


def _place_markers(planning: Patient, n: int, rng: np.random.Generator) -> dict:
    g = planning.grid
    region = planning.kind_mask(StructureKind.TARGET)
    if not region.any():
        region = planning.body_mask()
    idx = np.argwhere(region)
    pts = g.index_to_world(idx)
    chosen = [int(rng.integers(len(pts)))]
    d = np.linalg.norm(pts - pts[chosen[0]], axis=1)
    for _ in range(n - 1):  # farthest-point sampling: well spread, never collinear
        j = int(np.argmax(d))
        chosen.append(j)
        d = np.minimum(d, np.linalg.norm(pts - pts[j], axis=1))
    return {f"M{i + 1}": tuple(float(v) for v in pts[j]) for i, j in enumerate(chosen)}


def _burn_markers(ct: np.ndarray, grid: Grid, markers: dict) -> np.ndarray:
    ct = ct.copy()
    centres = grid.voxel_centres_xyz()
    for p in markers.values():
        k = np.rint(grid.world_to_index(p)).astype(int)
        ct[tuple(k)] = MARKER_HU
        lo = np.maximum(k - 2, 0)
        hi = np.minimum(k + 3, grid.shape_zyx)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        near = np.linalg.norm(centres[sl] - np.asarray(p), axis=-1) <= MARKER_RADIUS_MM
        ct[sl][near] = MARKER_HU
    return ct


def make_variant(patient: Patient, *, shift_mm_xyz=(0.0, 0.0, 0.0), rotation_deg_xyz=(0.0, 0.0, 0.0),
                 oar_grow_mm: float = 0.0, target_shrink_mm: float = 0.0, fov_mm=None, markers=True,
                 seed: int = 0, noise_hu: float = 0.0, tissue_contrast: bool = True,
                 new_grid: Grid | None = None) -> Variant:
    """A new CT of ``patient`` with a known planning -> new mapping.

    The anatomy is first deformed (every OAR grown by about ``oar_grow_mm``, every target
    shrunk by about ``target_shrink_mm``, by the smooth field of :func:`deformation_field`),
    then rotated by ``rotation_deg_xyz`` (about x, then y, then z, see
    :func:`~ids_engine.registration.rotation_matrix`) about the targets' centroid (the grid
    centre without a target) and shifted by ``shift_mm_xyz``:
    ``x_new = R @ (x + w(x) - c) + c + shift``.

    Parameters
    ----------
    patient : the planning patient.
    fov_mm : None (full field of view) or the edge lengths (one number or (x, y, z)) of a
        box centred on the target in the new CT: the new CT holds air outside it and
        ``meta["fov_box_mm_xyz"]`` flags the box (claim 4 of seed 003).
    markers : True (4 markers), a count (>= 3), or False; seeds of 2500 HU and 1.5 mm
        radius in the target, burnt into the planning CT and carried with the anatomy.
    seed : seeds the marker positions and the noise.
    noise_hu : standard deviation of Gaussian noise added to the new CT, HU.
    tissue_contrast : when the body is uniform (the phantoms' water), add +30 HU to the
        targets, +60 HU to the OARs and a smooth random texture (15 HU standard deviation,
        5 mm correlation) to the body of the planning CT, so that images show anatomy as a
        patient's CT does (seeded by ``seed``).
    new_grid : the new CT's grid (default: the planning grid).
    """
    if not isinstance(patient, Patient):
        raise RegistrationError("make_variant: patient must be a Patient")
    shift = _triple(shift_mm_xyz, "shift_mm_xyz")
    rot = rotation_matrix(_triple(rotation_deg_xyz, "rotation_deg_xyz"))
    for name, v in (("oar_grow_mm", oar_grow_mm), ("target_shrink_mm", target_shrink_mm), ("noise_hu", noise_hu)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise RegistrationError(f"make_variant: {name} must be a finite number >= 0, got {v!r}")
    if max(oar_grow_mm, target_shrink_mm) >= DEFORMATION_SIGMA_MM * math.sqrt(math.e):
        raise RegistrationError(f"make_variant: oar_grow_mm / target_shrink_mm must be below "
                                f"{DEFORMATION_SIGMA_MM * math.sqrt(math.e):.1f} mm (the field would fold)")
    n_markers = 4 if markers is True else (0 if markers is False else int(markers))
    if n_markers and n_markers < 3:
        raise RegistrationError(f"make_variant: markers must be True, False or a count >= 3, got {markers!r}")
    rng = np.random.default_rng(seed)
    g = patient.grid
    ng = new_grid or g

    # ---- the planning CT as used: contrast, markers
    ct = patient.ct_hu.astype(np.float32)
    body = patient.body_mask()
    contrast = False
    if tissue_contrast and body.any() and float(np.std(ct[body])) < 1.0:
        ct = ct.copy()
        ct[patient.kind_mask(StructureKind.TARGET) & body] += TARGET_CONTRAST_HU
        ct[patient.kind_mask(StructureKind.OAR) & body] += OAR_CONTRAST_HU
        # Tissue texture: smooth (about 5 mm) random HU variation, as soft tissue shows.
        tex = ndimage.gaussian_filter(np.random.default_rng(10_000 + int(seed)).normal(size=ct.shape),
                                      [TEXTURE_SIGMA_MM / s for s in g.spacing_mm_zyx])
        tex *= TEXTURE_HU / max(float(tex[body].std()), 1e-12)
        ct[body] += tex[body].astype(np.float32)
        contrast = True
    fid_p = _place_markers(patient, n_markers, rng) if n_markers else {}
    if fid_p:
        ct = _burn_markers(ct, g, fid_p)
    planning = replace(patient, ct_hu=ct, meta={**patient.meta, "markers_hu": MARKER_HU if fid_p else None,
                                                 "tissue_contrast": contrast})

    # ---- the known mapping
    targets = patient.kind_mask(StructureKind.TARGET)
    if targets.any():
        centre = g.index_to_world(np.argwhere(targets).mean(axis=0))
    else:
        centre = g.index_to_world((np.asarray(g.shape_zyx) - 1) / 2.0)
    t = centre + shift - rot @ centre
    spec = {"shift_mm_xyz": shift.tolist(), "rotation_deg_xyz": list(map(float, _triple(rotation_deg_xyz, "rotation_deg_xyz"))),
            "rotation_centre_mm_xyz": centre.tolist(), "oar_grow_mm": float(oar_grow_mm),
            "target_shrink_mm": float(target_shrink_mm), "fov_mm": None if fov_mm is None else _triple(fov_mm, "fov_mm").tolist(),
            "markers": n_markers, "seed": int(seed), "noise_hu": float(noise_hu)}
    if oar_grow_mm or target_shrink_mm:
        w = deformation_field(planning, float(oar_grow_mm), float(target_shrink_mm))
        y = ng.voxel_centres_xyz().reshape(-1, 3)
        p = (y - t) @ rot  # R.T @ (y - t)
        e = (sample_field(w, g, p) @ rot.T).reshape(tuple(ng.shape_zyx) + (3,))
        d, info = invert_displacement(e, ng, iterations=50, tolerance_mm=1e-4)
        truth = Registration("deformable", g, ng, rot, t, displacement_mm_xyz=d, inverse_displacement_mm_xyz=e,
                             metrics={"metric": "known (make_variant)", **info})
    else:
        truth = Registration("rigid", g, ng, rot, t, metrics={"metric": "known (make_variant)"})

    # ---- the new CT and its true structures
    new_ct = truth.warp_to_new(planning.ct_hu, order=1, fill=AIR_HU)
    if noise_hu:
        new_ct = new_ct + rng.normal(0.0, float(noise_hu), new_ct.shape).astype(np.float32)
    structures = []
    volumes = {}
    for s in patient.structures:
        m = truth.warp_mask_to_new(s.mask)
        structures.append(Structure(s.name, s.kind, m, ng, s.colour, dict(s.meta)))
        volumes[s.name] = {"planning_cc": round(s.volume_cc, 3), "new_cc": round(float(m.sum()) * ng.voxel_volume_cc, 3)}
    spec["volumes"] = volumes
    meta = {**patient.meta, "variant": spec}
    fid_n = {}
    if fid_p:
        moved = truth.map_points_xyz(np.asarray(list(fid_p.values())))
        fid_n = {k: tuple(float(v) for v in moved[i]) for i, k in enumerate(fid_p)}
    if fov_mm is not None:
        size = _triple(fov_mm, "fov_mm")
        if np.any(size <= 0):
            raise RegistrationError(f"make_variant: fov_mm must be positive, got {fov_mm!r}")
        c_new = truth.map_points_xyz(centre)
        box = np.stack([c_new - size / 2.0, c_new + size / 2.0], axis=1)
        meta["fov_box_mm_xyz"] = box.tolist()
        from ._sitk import fov_mask  # no SimpleITK import: a plain helper

        tmp = Patient(ng, new_ct, meta=meta)
        new_ct = np.where(fov_mask(tmp), new_ct, np.float32(AIR_HU)).astype(np.float32)
    new = Patient(grid=ng, ct_hu=new_ct, structures=tuple(structures), points=patient.points,
                  density_curve=patient.density_curve, name=f"{patient.name} (variant)",
                  patient_position=patient.patient_position, frame_of_reference_uid="", meta=meta)
    return Variant(planning, new, truth, fid_p, fid_n, spec)


def _parse_floats(value: str, field_name: str, n: int | None = 3) -> list[float]:
    try:
        vals = [float(v) for v in value.split(",")]
    except ValueError:
        raise RegistrationError(f"variant spec: {field_name}: expected numbers, got {value!r}") from None
    if n is not None and len(vals) != n:
        raise RegistrationError(f"variant spec: {field_name}: expected {n} comma-separated numbers, got {value!r}")
    return vals


def variant_from_spec(text: str) -> Variant:
    """A :class:`Variant` from a one-line spec.

    ``"<phantom>[:<resolution>];key=value;..."``, e.g.
    ``"horseshoe:coarse;shift_mm=3,-2,0;rotate_deg=0,0,4;oar_grow_mm=2;target_shrink_mm=2"``.
    Keys: ``shift_mm`` (x,y,z), ``rotate_deg`` (about x,y,z), ``oar_grow_mm``,
    ``target_shrink_mm``, ``fov_mm`` (one number or x,y,z), ``markers`` (count, 0 for
    none), ``seed``, ``noise_hu``.
    """
    from ..phantoms import PHANTOMS

    parts = [p.strip() for p in str(text).split(";") if p.strip()]
    if not parts:
        raise RegistrationError("variant spec: empty (expected e.g. 'horseshoe:coarse;shift_mm=3,0,0')")
    head = parts[0]
    name, _, res = head.partition(":")
    name = name.strip()
    if name not in PHANTOMS:
        raise RegistrationError(f"variant spec: phantom {name!r} is not one of {', '.join(PHANTOMS)}")
    try:
        patient = PHANTOMS[name](res.strip() or "coarse")
    except ValueError as exc:
        raise RegistrationError(f"variant spec: resolution: {exc}") from exc
    kw: dict = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        value = value.strip()
        if not eq or not value:
            raise RegistrationError(f"variant spec: {part!r}: expected key=value")
        if key == "shift_mm":
            kw["shift_mm_xyz"] = _parse_floats(value, key)
        elif key == "rotate_deg":
            kw["rotation_deg_xyz"] = _parse_floats(value, key)
        elif key in ("oar_grow_mm", "target_shrink_mm", "noise_hu"):
            kw[key] = _parse_floats(value, key, 1)[0]
        elif key == "fov_mm":
            v = _parse_floats(value, key, None)
            if len(v) not in (1, 3):
                raise RegistrationError(f"variant spec: fov_mm: expected one or three numbers, got {value!r}")
            kw["fov_mm"] = v[0] if len(v) == 1 else v
        elif key in ("markers", "seed"):
            try:
                n = int(value)
            except ValueError:
                raise RegistrationError(f"variant spec: {key}: expected an integer, got {value!r}") from None
            kw[key] = (n if n else False) if key == "markers" else n
        else:
            raise RegistrationError(f"variant spec: unknown field {key!r} (known: shift_mm, rotate_deg, oar_grow_mm, "
                                    "target_shrink_mm, fov_mm, markers, seed, noise_hu)")
    return make_variant(patient, **kw)
