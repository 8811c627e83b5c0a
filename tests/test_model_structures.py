"""Structures, their algebra and margins; Patient validation and "new volume from old"; density."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ids_engine.model import (
    DEFAULT_DENSITY_CURVE,
    DensityCurve,
    Grid,
    Patient,
    PointOfInterest,
    Structure,
    StructureKind,
    contract,
    expand,
    intersection,
    subtract,
    union,
)

# ----------------------------------------------------------------- helpers
BOX_GRID = Grid((20, 20, 20), (1.0, 1.0, 1.0))


def _box(name: str, i0: int, i1: int, j0: int, j1: int, k0: int, k1: int, grid: Grid = BOX_GRID) -> Structure:
    """A box of voxels with index ranges [k0, k1) x [j0, j1) x [i0, i1)."""
    m = np.zeros(grid.shape_zyx, dtype=bool)
    m[k0:k1, j0:j1, i0:i1] = True
    return Structure(name, "oar", m, grid)


# Anisotropic grid for margins: 1 x 1 x 2.5 mm (x, y, z), voxel centred on the origin.
SPHERE_GRID = Grid((25, 71, 71), (2.5, 1.0, 1.0), (-30.0, -35.0, -35.0))
SPHERE_R_MM = 20.0
# Covering radius of the lattice: every point lies within half a voxel diagonal of a centre.
HALF_DIAGONAL_MM = 0.5 * math.sqrt(1.0 + 1.0 + 2.5**2)


def _radii(grid: Grid) -> np.ndarray:
    return np.linalg.norm(grid.voxel_centres_xyz(), axis=-1)


def _ball_cc(r_mm: float) -> float:
    return 4.0 / 3.0 * math.pi * r_mm**3 / 1000.0


@pytest.fixture(scope="module")
def sphere() -> Structure:
    return Structure("sphere", "target", _radii(SPHERE_GRID) <= SPHERE_R_MM, SPHERE_GRID)


# ------------------------------------------------------------------ algebra
def test_union_intersection_subtract_volumes():
    # A: 8 x 8 x 8 = 512 voxels; B: the same box shifted by 4 voxels in x; overlap 4 x 8 x 8 = 256.
    a = _box("A", 2, 10, 2, 10, 2, 10)
    b = _box("B", 6, 14, 2, 10, 2, 10)
    assert a.voxel_count == 512 and b.voxel_count == 512
    assert union("U", a, b).voxel_count == 768
    assert intersection("I", a, b).voxel_count == 256
    assert subtract("A-B", a, b).voxel_count == 256
    # A third box disjoint from A: 2 x 2 x 2 = 8 voxels.
    c = _box("C", 15, 17, 15, 17, 15, 17)
    assert union("U3", a, b, c).voxel_count == 776
    assert intersection("I0", a, c).is_empty
    assert subtract("A-B-C", a, b, c).voxel_count == 256
    # 1 mm^3 voxels: 768 voxels = 0.768 cm^3.
    assert union("U", a, b).volume_cc == pytest.approx(0.768)


def test_algebra_keeps_kind_and_colour_unless_given():
    a = Structure("A", "target", np.ones(BOX_GRID.shape_zyx, bool), BOX_GRID, (0.2, 0.3, 0.4))
    b = _box("B", 0, 5, 0, 5, 0, 5)
    u = union("U", a, b)
    assert u.kind is StructureKind.TARGET and u.colour == (0.2, 0.3, 0.4)
    s = subtract("S", a, b, kind="oar", colour=(1.0, 1.0, 0.0))
    assert s.kind is StructureKind.OAR and s.colour == (1.0, 1.0, 0.0)
    assert s.voxel_count == 20**3 - 5**3


def test_algebra_refuses_different_grids():
    other = Grid((20, 20, 20), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="different grids"):
        union("U", _box("A", 0, 2, 0, 2, 0, 2), _box("B", 0, 2, 0, 2, 0, 2, grid=other))
    with pytest.raises(ValueError, match="at least one"):
        union("U")
    with pytest.raises(ValueError, match="at least one"):
        intersection("I")


def test_structure_basics():
    s = _box("A", 2, 4, 6, 10, 1, 2)  # x 2..3, y 6..9, z 1
    np.testing.assert_allclose(s.centroid_xyz(), [2.5, 7.5, 1.0])
    with pytest.raises(ValueError):
        s.mask[0, 0, 0] = True  # read-only
    r = s.renamed("B", kind="target")
    assert r.name == "B" and r.kind is StructureKind.TARGET and r.voxel_count == s.voxel_count
    with pytest.raises(ValueError, match="no centroid"):
        Structure("E", "oar", np.zeros(BOX_GRID.shape_zyx, bool), BOX_GRID).centroid_xyz()


@pytest.mark.parametrize("alias, kind", [("PTV", "target"), ("organ", "oar"), ("Body", "external"), ("OAR", "oar")])
def test_kind_aliases(alias, kind):
    assert StructureKind.parse(alias) is StructureKind(kind)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "tumourish"}, "kind"),
        ({"mask": np.zeros((20, 20, 19), bool)}, "mask shape"),
        ({"name": "  "}, "name"),
        ({"colour": (1.0, 0.0, 2.0)}, "colour"),
    ],
)
def test_structure_validation(kwargs, match):
    args = {"name": "S", "kind": "oar", "mask": np.zeros(BOX_GRID.shape_zyx, bool), "grid": BOX_GRID}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Structure(**args)


# ------------------------------------------------------------------ margins
def test_sphere_sampling(sphere):
    assert sphere.volume_cc == pytest.approx(_ball_cc(SPHERE_R_MM), rel=0.01)


@pytest.mark.parametrize("margin_mm", [5.0, 10.0])
def test_expand_sphere_anisotropic(sphere, margin_mm):
    """Expansion keeps the voxels whose centre lies within the margin of a centre of the
    sphere. Bounds by the triangle inequality: no centre farther than r + m from the origin
    joins; every centre nearer than r + m - 2h joins (h: half the voxel diagonal, the
    lattice's covering radius)."""
    grown = expand("grown", sphere, margin_mm)
    r = _radii(SPHERE_GRID)
    assert r[grown.mask].max() <= SPHERE_R_MM + margin_mm + 1e-9
    assert grown.mask[r <= SPHERE_R_MM + margin_mm - 2 * HALF_DIAGONAL_MM].all()
    assert not (sphere.mask & ~grown.mask).any()
    # Centre-to-centre margins run a little short of the analytic ball on this 2.5 mm z grid
    # (about 4 % of the volume here).
    assert grown.volume_cc == pytest.approx(_ball_cc(SPHERE_R_MM + margin_mm), rel=0.05)
    assert grown.kind is sphere.kind


@pytest.mark.parametrize("margin_mm", [5.0, 10.0])
def test_contract_sphere_anisotropic(sphere, margin_mm):
    """Contraction keeps the voxels whose centre is farther than the margin from every
    outside centre: all centres nearer than r - m stay; none farther than r - m + 2h."""
    shrunk = contract("shrunk", sphere, margin_mm)
    r = _radii(SPHERE_GRID)
    assert shrunk.mask[r < SPHERE_R_MM - margin_mm].all()
    assert r[shrunk.mask].max() <= SPHERE_R_MM - margin_mm + 2 * HALF_DIAGONAL_MM
    assert not (shrunk.mask & ~sphere.mask).any()
    assert shrunk.volume_cc == pytest.approx(_ball_cc(SPHERE_R_MM - margin_mm), rel=0.05)


def test_contract_then_expand_recovers(sphere):
    opened = expand("opened", contract("c", sphere, 5.0), 5.0)
    assert not (opened.mask & ~sphere.mask).any()  # an opening never grows the shape
    dice = 2.0 * (opened.mask & sphere.mask).sum() / (opened.voxel_count + sphere.voxel_count)
    assert dice > 0.98
    assert opened.volume_cc == pytest.approx(sphere.volume_cc, rel=0.03)


def test_expand_axis_extent_matches_margin_per_axis(sphere):
    """Along the axes the margin is exact in mm: the sphere's pole centres (z = +-20, a
    multiple of 2.5) move out to z = +-25 and its equator centres (x = +-20) to x = +-27."""
    grown = expand("g", sphere, 7.0)
    (x0, x1), (y0, y1), (z0, z1) = _bbox_mm(grown)
    assert (x0, x1) == (-27.0, 27.0) and (y0, y1) == (-27.0, 27.0)
    # z: 20 + 7 = 27 is not on the 2.5 mm lattice; the last centre within reach is 25.
    assert (z0, z1) == (-25.0, 25.0)


def _bbox_mm(s: Structure):
    idx = np.argwhere(s.mask)
    lo = s.grid.index_to_world(idx.min(axis=0))
    hi = s.grid.index_to_world(idx.max(axis=0))
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


def test_margin_edge_cases(sphere):
    assert np.array_equal(expand("e0", sphere, 0.0).mask, sphere.mask)
    assert np.array_equal(contract("c0", sphere, 0.0).mask, sphere.mask)
    assert contract("gone", sphere, 25.0).is_empty
    with pytest.raises(ValueError, match="margin_mm"):
        expand("bad", sphere, -1.0)
    with pytest.raises(ValueError, match="margin_mm"):
        contract("bad", sphere, -1.0)


def test_contract_treats_grid_border_as_outside():
    full = Structure("full", "external", np.ones(BOX_GRID.shape_zyx, bool), BOX_GRID)
    # 1 mm voxels, shrink by 2 mm: the outer two layers go, 16^3 voxels stay.
    assert contract("c", full, 2.0).voxel_count == 16**3


# ------------------------------------------------------------------ patient
PAT_GRID = Grid((41, 41, 41), (2.0, 2.0, 2.0), (-40.0, -40.0, -40.0))


@pytest.fixture(scope="module")
def patient() -> Patient:
    """A 2 mm grid, a box body |x|, |y|, |z| <= 36 mm, a target sphere of radius 10 mm."""
    c = PAT_GRID.voxel_centres_xyz()
    body = np.all(np.abs(c) <= 36.0, axis=-1)
    target = np.linalg.norm(c, axis=-1) <= 10.0
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    return Patient(
        PAT_GRID,
        ct,
        (Structure("BODY", "external", body, PAT_GRID), Structure("PTV", "target", target, PAT_GRID)),
        (PointOfInterest("ISO", (0.0, 0.0, 0.0)),),
    )


def test_new_structure_ring(patient):
    """Ring = BODY minus (PTV + 20 mm). Bounds as for expand: a body voxel farther than
    10 + 20 mm from the centre is in the ring; none nearer than 30 - 2h mm (h = sqrt(3))."""
    p2 = patient.new_structure_from("ring", "BODY", subtract_names=["PTV"], subtract_margins_mm=[20.0], kind="oar")
    ring = p2.structure("ring")
    assert ring.kind is StructureKind.OAR
    assert p2.structure_names == ("BODY", "PTV", "ring")
    r = _radii(PAT_GRID)
    body = patient.structure("BODY").mask
    assert ring.mask[body & (r > 30.0)].all()
    assert not ring.mask[r <= 30.0 - 2.0 * math.sqrt(3.0)].any()
    assert not (ring.mask & ~body).any()
    # The same thing by hand with the algebra functions.
    by_hand = subtract("ring", patient.structure("BODY"), expand("x", patient.structure("PTV"), 20.0))
    assert np.array_equal(ring.mask, by_hand.mask)
    # The original patient is unchanged (frozen values).
    assert patient.structure_names == ("BODY", "PTV")


def test_new_structure_margins(patient):
    ptv = patient.structure("PTV")
    grown = patient.new_structure_from("PTV+5", "PTV", margin_mm=5.0).structure("PTV+5")
    assert np.array_equal(grown.mask, expand("e", ptv, 5.0).mask)
    assert grown.kind is StructureKind.TARGET
    shrunk = patient.new_structure_from("PTV-4", "PTV", margin_mm=-4.0).structure("PTV-4")
    assert np.array_equal(shrunk.mask, contract("c", ptv, 4.0).mask)
    # A shell: PTV minus (PTV - 4 mm), subtracting with a negative margin.
    shell = patient.new_structure_from("shell", "PTV", subtract_names=["PTV"], subtract_margins_mm=[-4.0])
    assert shell.structure("shell").voxel_count == ptv.voxel_count - shrunk.voxel_count


def test_new_structure_errors(patient):
    with pytest.raises(KeyError, match="no structure 'liver'"):
        patient.new_structure_from("x", "liver")
    with pytest.raises(ValueError, match="one margin per"):
        patient.new_structure_from("x", "BODY", subtract_names=["PTV"], subtract_margins_mm=[1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        patient.new_structure_from("x", "PTV", subtract_names=["BODY"])
    with pytest.raises(ValueError, match="exists already"):
        patient.new_structure_from("PTV", "BODY", margin_mm=-2.0)


def test_patient_validation(patient):
    body = patient.structure("BODY")
    with pytest.raises(ValueError, match="duplicate names"):
        Patient(PAT_GRID, patient.ct_hu, (body, body.renamed("BODY")))
    with pytest.raises(ValueError, match="ct_hu shape"):
        Patient(PAT_GRID, np.zeros((41, 41, 40), np.float32))
    other = Grid((41, 41, 41), (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="not on the CT grid"):
        Patient(PAT_GRID, patient.ct_hu, (Structure("S", "oar", body.mask, other),))
    with pytest.raises(ValueError, match="patient_position"):
        Patient(PAT_GRID, patient.ct_hu, patient_position="sitting")
    with pytest.raises(ValueError, match="mask shape"):
        Structure("S", "oar", np.zeros((41, 41, 40), bool), PAT_GRID)
    with pytest.raises(ValueError, match="kind"):
        Structure("S", "bladder", body.mask, PAT_GRID)


def test_patient_accessors(patient):
    assert [s.name for s in patient.targets] == ["PTV"]
    assert patient.oars == ()
    assert patient.external.name == "BODY"
    assert patient.ct_hu.dtype == np.float32 and not patient.ct_hu.flags.writeable
    assert patient.patient_position == "HFS"
    no_body = patient.without_structures("BODY")
    # Without an external contour, the body falls back to CT > -500 HU: the same box here.
    assert np.array_equal(no_body.body_mask(), patient.body_mask())
    rows = {row["name"]: row for row in patient.summary()}
    assert rows["BODY"]["voxels"] == 37**3  # |coordinate| <= 36 on the 2 mm lattice: 37 centres per axis
    assert rows["BODY"]["volume_cc"] == pytest.approx(37**3 * 0.008)
    with pytest.raises(KeyError):
        patient.without_structures("liver")


# ------------------------------------------------------------------ density
def test_default_density_curve_values():
    red = DEFAULT_DENSITY_CURVE(np.array([-1000.0, -800.0, -700.0, 0.0, 100.0, 1000.0]))
    assert red.dtype == np.float32
    np.testing.assert_allclose(red, [0.001, 0.20, 0.30, 1.0, 1.07, 1.55], atol=1e-6)
    assert DEFAULT_DENSITY_CURVE(np.array(-1000.0)) < 0.01


def test_default_density_curve_monotone_and_non_negative():
    hu = np.linspace(-1500.0, 4000.0, 1101)
    red = DEFAULT_DENSITY_CURVE(hu)
    assert np.all(np.diff(red) >= 0.0)
    assert red.min() >= 0.0
    # Below the table the end segment is extrapolated and clipped at zero.
    assert DEFAULT_DENSITY_CURVE(np.array(-1200.0)) == 0.0
    # Above it the last segment (slope 1.0 / 2000 HU) continues: 3000 -> 2.55, 4000 -> 3.05.
    np.testing.assert_allclose(DEFAULT_DENSITY_CURVE(np.array([3000.0, 4000.0])), [2.55, 3.05], rtol=1e-6)


def test_patient_density_uses_curve(patient):
    red = patient.relative_electron_density()
    assert red.shape == PAT_GRID.shape_zyx and red.dtype == np.float32
    assert red[20, 20, 20] == pytest.approx(1.0)
    assert red[0, 0, 0] == pytest.approx(0.001)


@pytest.mark.parametrize(
    "hu, red",
    [((0.0, 0.0), (1.0, 1.0)), ((0.0, -10.0), (1.0, 1.0)), ((0.0,), (1.0,)), ((0.0, 1.0), (1.0, -0.5))],
)
def test_density_curve_validation(hu, red):
    with pytest.raises(ValueError, match="DensityCurve"):
        DensityCurve(hu, red)


def test_points_of_interest_are_added_and_validated():
    from ids_engine.model import Grid, Patient, PointOfInterest

    g = Grid((2, 3, 4), (1.0, 1.0, 1.0))
    p = Patient(g, np.zeros(g.shape_zyx)).with_points(PointOfInterest("ISO", (1, 2, 3)), PointOfInterest("REF", (0, 0, 0)))
    assert [q.label for q in p.points] == ["ISO", "REF"]
    assert p.points[0].position_mm_xyz == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="label"):
        PointOfInterest(" ", (0, 0, 0))
    with pytest.raises(ValueError, match="three finite numbers"):
        PointOfInterest("X", (0, float("nan"), 0))


def test_kind_mask_is_the_union_of_that_kind():
    from dataclasses import replace

    a, b, c = _box("a", 0, 5, 0, 5, 0, 5), _box("b", 3, 8, 3, 8, 3, 8), _box("c", 10, 12, 10, 12, 10, 12)
    a = replace(a, kind=StructureKind.TARGET)
    patient = Patient(BOX_GRID, np.zeros(BOX_GRID.shape_zyx, np.float32), structures=(a, b, c))
    assert np.array_equal(patient.kind_mask("target"), a.mask)
    assert np.array_equal(patient.kind_mask("oar"), b.mask | c.mask)
    assert not patient.kind_mask("external").any()
    with pytest.raises(ValueError, match="structure kind 'tumour'"):
        patient.kind_mask("tumour")
