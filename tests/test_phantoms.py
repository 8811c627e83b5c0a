"""Built-in phantoms: geometry, volumes against the analytic shapes, CT values, metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ids_engine.model import DEFAULT_DENSITY_CURVE, Beam, Patient, StructureKind, expand
from ids_engine.phantoms import PHANTOMS, horseshoe, slab_box, tg119, water_box

# Analytic volumes, cm^3, from the shapes described in each phantom's docstring.
HORSESHOE_PTV_CC = 0.75 * math.pi * (60.0**2 - 30.0**2) * 70.0 / 1000.0  # 445.3
HORSESHOE_OAR_CC = 4.0 / 3.0 * math.pi * 25.0**3 / 1000.0  # 65.4
TG119_PUBLISHED_CC = {"OuterTarget": 167.8, "Core": 29.7}


@pytest.fixture(scope="module")
def horseshoe_coarse() -> Patient:
    return horseshoe(resolution="coarse")


@pytest.fixture(scope="module")
def horseshoe_clinical() -> Patient:
    return horseshoe()


@pytest.fixture(scope="module")
def tg119_coarse() -> Patient:
    return tg119(resolution="coarse")


@pytest.fixture(scope="module")
def tg119_clinical() -> Patient:
    return tg119()


def _coords(p: Patient):
    g = p.grid
    return g.axis_mm("x")[None, None, :], g.axis_mm("y")[None, :, None], g.axis_mm("z")[:, None, None]


def _bbox_mm(mask: np.ndarray, p: Patient):
    idx = np.argwhere(mask)
    lo = p.grid.index_to_world(idx.min(axis=0))
    hi = p.grid.index_to_world(idx.max(axis=0))
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


# ------------------------------------------------------------- all phantoms
@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_every_phantom_builds_coarse(name):
    p = PHANTOMS[name](resolution="coarse")
    assert isinstance(p, Patient)
    assert p.ct_hu.dtype == np.float32 and p.ct_hu.shape == p.grid.shape_zyx
    assert p.patient_position == "HFS"
    body = p.structure("BODY")
    assert body.kind is StructureKind.EXTERNAL
    # Water body in air; the outer layer of the grid is air.
    assert np.all(p.ct_hu[~body.mask] == -1000.0)
    for face in (p.ct_hu[0], p.ct_hu[-1], p.ct_hu[:, 0], p.ct_hu[:, -1], p.ct_hu[:, :, 0], p.ct_hu[:, :, -1]):
        assert np.all(face == -1000.0)
    # Every structure lies inside the body and is non-empty; colours are distinct.
    for s in p.structures:
        assert not s.is_empty and not (s.mask & ~body.mask).any(), s.name
    assert len({s.colour for s in p.structures}) == len(p.structures)
    iso = {poi.label: poi for poi in p.points}["ISO"]
    assert iso.position_mm_xyz == (0.0, 0.0, 0.0)
    assert body.mask[tuple(p.grid.nearest_index(iso.position_mm_xyz))]
    assert p.meta["resolution"] == "coarse"


@pytest.mark.parametrize("factory", [horseshoe, tg119, water_box, slab_box])
def test_bad_resolution(factory):
    with pytest.raises(ValueError, match="resolution"):
        factory(resolution="fine")


def test_grids_are_centred_on_the_origin():
    for factory in (horseshoe, tg119, water_box, slab_box):
        for res in ("clinical", "coarse"):
            g = factory(resolution=res).grid
            for (lo, hi) in g.extent_mm_xyz():
                assert lo == pytest.approx(-hi, abs=1e-9)


# ---------------------------------------------------------------- horseshoe
def test_horseshoe_grids(horseshoe_coarse, horseshoe_clinical):
    clinical, coarse = horseshoe_clinical.grid, horseshoe_coarse.grid
    assert clinical.spacing_mm_xyz == (1.952, 1.952, 2.0)
    assert coarse.spacing_mm_xyz == (3.904, 3.904, 4.0)
    assert clinical.shape_zyx == (85, 113, 161)
    assert coarse.shape_zyx == (43, 57, 81)
    # The isocentre is the centre of the middle voxel.
    np.testing.assert_allclose(clinical.index_to_world([42, 56, 80]), [0.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(coarse.index_to_world([21, 28, 40]), [0.0, 0.0, 0.0], atol=1e-9)


def test_horseshoe_structures(horseshoe_coarse):
    p = horseshoe_coarse
    assert p.structure_names == ("PTV", "OAR", "BODY")
    assert [s.name for s in p.targets] == ["PTV"]
    assert [s.name for s in p.oars] == ["OAR"]
    assert p.external.name == "BODY"


@pytest.mark.parametrize("fixture, rel", [("horseshoe_coarse", 0.04), ("horseshoe_clinical", 0.015)])
def test_horseshoe_volumes(fixture, rel, request):
    p = request.getfixturevalue(fixture)
    assert p.structure("PTV").volume_cc == pytest.approx(HORSESHOE_PTV_CC, rel=rel)
    assert p.structure("OAR").volume_cc == pytest.approx(HORSESHOE_OAR_CC, rel=rel)
    # Body: an elliptic cylinder 300 x 200 x 160 mm (its z faces lie on voxel centres,
    # which count as inside, so the voxelised body is one slice longer).
    assert p.structure("BODY").volume_cc == pytest.approx(math.pi * 150.0 * 100.0 * 160.0 / 1000.0, rel=0.03)


def test_horseshoe_gap_and_shape(horseshoe_clinical):
    p = horseshoe_clinical
    ptv, oar = p.structure("PTV"), p.structure("OAR")
    # 5 mm between the sphere (r = 25) and the inner face of the target (r = 30).
    assert not (expand("OAR+4.9", oar, 4.9).mask & ptv.mask).any()
    assert (expand("OAR+6", oar, 6.0).mask & ptv.mask).any()
    # Extents: outer diameter 120 mm, 70 mm long; the sphere 50 mm across.
    (x0, x1), (y0, y1), (z0, z1) = _bbox_mm(ptv.mask, p)
    assert x1 - x0 == pytest.approx(120.0, abs=2 * 1.952)
    assert (z0, z1) == (-34.0, 34.0)
    assert y0 == pytest.approx(-60.0, abs=1.952)
    (ox0, ox1), _, (oz0, oz1) = _bbox_mm(oar.mask, p)
    assert ox1 - ox0 == pytest.approx(50.0, abs=2 * 1.952)
    assert (oz0, oz1) == (-24.0, 24.0)
    # The opening faces posterior (+y): target on the -y, +x and -x axes but not on +y.
    x, y, z = _coords(p)
    on_axis = (np.abs(z) < 1.0) & (np.hypot(x, y) > 35.0) & (np.hypot(x, y) < 55.0)
    m = ptv.mask
    assert m[on_axis & (np.abs(x) < 1.0) & (y < 0)].all()
    assert not m[on_axis & (np.abs(x) < 1.0) & (y > 0)].any()
    assert m[on_axis & (np.abs(y) < 1.0)].all()
    # 90 degree opening: the 45 degree lines bound it.
    assert not m[(np.abs(z) < 1.0) & (y > np.abs(x) + 3.0)].any()
    c = ptv.centroid_xyz()
    assert abs(c[0]) < 0.5 and c[1] < -5.0 and abs(c[2]) < 0.5
    np.testing.assert_allclose(oar.centroid_xyz(), [0.0, 0.0, 0.0], atol=1e-9)


def test_horseshoe_ct(horseshoe_coarse):
    p = horseshoe_coarse
    body = p.body_mask()
    assert np.all(p.ct_hu[body] == 0.0)
    assert set(np.unique(p.ct_hu).tolist()) == {-1000.0, 0.0}
    red = p.relative_electron_density()
    assert red[body].min() == pytest.approx(1.0)


# -------------------------------------------------------------------- TG-119
@pytest.mark.parametrize("fixture", ["tg119_coarse", "tg119_clinical"])
def test_tg119_volumes_match_published(fixture, request):
    p = request.getfixturevalue(fixture)
    assert p.structure("OuterTarget").volume_cc == pytest.approx(TG119_PUBLISHED_CC["OuterTarget"], rel=0.10)
    assert p.structure("Core").volume_cc == pytest.approx(TG119_PUBLISHED_CC["Core"], rel=0.10)
    assert p.structure("BODY").volume_cc == pytest.approx(13539.0, rel=0.10 if fixture.endswith("coarse") else 0.02)


def test_tg119_clinical_geometry(tg119_clinical):
    p = tg119_clinical
    assert p.grid.spacing_mm_xyz == (3.0, 3.0, 2.5)
    assert p.structure_names == ("OuterTarget", "Core", "BODY")
    target, core = p.structure("OuterTarget"), p.structure("Core")
    assert target.kind is StructureKind.TARGET and core.kind is StructureKind.OAR
    assert not (target.mask & core.mask).any()
    # Published extents (contour extents of the data set, mm), within a voxel.
    for mask, published, tol in [
        (target.mask, ((-37, 35), (-37, 5), (-40, 40)), (3.0, 3.0, 2.5)),
        (core.mask, ((-10, 8), (-10, 8), (-47.5, 50)), (3.0, 3.0, 2.5)),
        (p.body_mask(), ((-154, 149), (-76, 74), (-152.5, 147.5)), (3.0, 3.0, 2.5)),
    ]:
        for (lo, hi), (plo, phi), t in zip(_bbox_mm(mask, p), published, tol):
            # The data set is centred about 1-2.5 mm off the origin; allow that plus a voxel.
            assert lo == pytest.approx(plo, abs=t + 2.5)
            assert hi == pytest.approx(phi, abs=t + 2.5)
    # The C opens towards +y: no target voxel beyond y = 6 mm, target on the -y side of the core.
    x, y, z = _coords(p)
    assert not (target.mask & (y > 6.0)).any()
    assert target.centroid_xyz()[1] < -10.0
    # The core runs beyond both ends of the target.
    (_, _, (tz0, tz1)), (_, _, (cz0, cz1)) = _bbox_mm(target.mask, p), _bbox_mm(core.mask, p)
    assert cz0 < tz0 and cz1 > tz1


def test_tg119_meta(tg119_coarse):
    meta = tg119_coarse.meta
    assert meta["published_volume_cc"]["OuterTarget"] == 167.8
    assert meta["prescription_gy"] == 50.0
    assert meta["gantry_angles_deg"] == (0.0, 40.0, 80.0, 120.0, 160.0, 200.0, 240.0, 280.0, 320.0)
    assert np.all(tg119_coarse.ct_hu[tg119_coarse.body_mask()] == 0.0)


# --------------------------------------------------------------------- boxes
@pytest.mark.parametrize("resolution, spacing, n_inside", [("coarse", 5.0, 60), ("clinical", 2.0, 150)])
def test_water_box_default(resolution, spacing, n_inside):
    p = water_box(resolution=resolution)
    assert p.grid.spacing_mm_xyz == (spacing, spacing, spacing)
    # The faces lie on voxel boundaries: exactly (300 / spacing)^3 voxels of water, and two layers of air.
    assert p.structure("BODY").voxel_count == n_inside**3
    assert p.grid.shape_zyx == (n_inside + 4,) * 3
    assert p.structure("BODY").volume_cc == pytest.approx(27000.0)
    assert p.meta["anterior_surface_y_mm"] == -150.0
    np.testing.assert_allclose(p.structure("BODY").centroid_xyz(), [0.0, 0.0, 0.0], atol=1e-9)


def test_water_box_custom_size():
    p = water_box(resolution="coarse", size_mm=(100.0, 200.0, 50.0))
    assert p.structure("BODY").voxel_count == 20 * 40 * 10
    (x0, x1), (y0, y1), (z0, z1) = _bbox_mm(p.body_mask(), p)
    assert (x0, x1, y0, y1, z0, z1) == (-47.5, 47.5, -97.5, 97.5, -22.5, 22.5)
    with pytest.raises(ValueError, match="size_mm"):
        water_box(size_mm=(100.0, -1.0, 50.0))


@pytest.mark.parametrize("material, hu, red", [("lung", -700.0, 0.30), ("bone", 1000.0, 1.55)])
@pytest.mark.parametrize("resolution", ["coarse", "clinical"])
def test_slab_box(material, hu, red, resolution):
    p = slab_box(resolution=resolution, material=material)
    assert p.meta["slab_depth_mm"] == (50.0, 110.0)
    assert p.meta["slab_hu"] == hu
    slab, body = p.structure("SLAB"), p.structure("BODY")
    assert slab.kind is StructureKind.OAR
    _, y, _ = _coords(p)
    depth = y - p.meta["anterior_surface_y_mm"]
    # The slab is every body voxel whose centre lies between depths 50 and 110 mm.
    expected = body.mask & (depth > 50.0) & (depth < 110.0)
    assert np.array_equal(slab.mask, expected)
    s = p.grid.spacing_mm_zyx[1]
    assert slab.voxel_count == body.voxel_count * 60.0 / 300.0 == round(300 / s) ** 2 * round(60 / s)
    assert np.all(p.ct_hu[slab.mask] == hu)
    assert np.all(p.ct_hu[body.mask & ~slab.mask] == 0.0)
    assert DEFAULT_DENSITY_CURVE(np.array(hu)) == pytest.approx(red, abs=1e-6)


@pytest.mark.parametrize("material, hu", [("lung", -700.0), ("bone", 1000.0)])
def test_slab_on_gantry_0_central_axis(material, hu):
    """A gantry-0 beam enters at the anterior surface (y = -150) and runs towards +y; along
    its central axis it meets 50 mm of water, 60 mm of slab, then water to y = +150."""
    p = slab_box(resolution="coarse", material=material)
    beam = Beam(gantry_deg=0.0, isocentre_mm_xyz=(0.0, 0.0, 0.0))
    src, direction = beam.source_mm_xyz(), beam.direction_xyz()
    np.testing.assert_allclose(direction, [0.0, 1.0, 0.0], atol=1e-12)
    # Sample voxel centres along the axis: distance from the source = 850 + depth.
    depth = np.arange(2.5, 300.0, 5.0)
    pts = src + (1000.0 - 150.0 + depth)[:, None] * direction
    pts[:, 0] = 2.5  # a voxel column next to the axis (x = 0 is a voxel boundary here)
    pts[:, 2] = 2.5
    k, j, i = p.grid.nearest_index(pts).T
    hu_along = p.ct_hu[k, j, i]
    in_slab = (depth > 50.0) & (depth < 110.0)
    assert np.all(hu_along[in_slab] == hu)
    assert np.all(hu_along[~in_slab] == 0.0)


def test_slab_box_errors():
    with pytest.raises(ValueError, match="material"):
        slab_box(material="steel")
    with pytest.raises(ValueError, match="slab_depth_mm"):
        slab_box(resolution="coarse", slab_depth_mm=(120.0, 90.0))


def test_slab_box_custom_depths():
    p = slab_box(resolution="coarse", material="lung", slab_depth_mm=(100.0, 150.0))
    assert p.meta["slab_y_mm"] == (-50.0, 0.0)
    (_, _), (y0, y1), (_, _) = _bbox_mm(p.structure("SLAB").mask, p)
    assert (y0, y1) == (-47.5, -2.5)
