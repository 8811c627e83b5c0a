"""Make Conformed Beams on analytic phantoms: projected areas against geometry, the margin of
the volume (3-D, magnified with it), subtraction splitting a target into one beam per piece,
leaf modes nested, minimum area, collimator search, and the dose of the apertures."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import MLC, Beam, Grid, Patient, Structure, default_mlc, expand
from ids_engine.planning._conformal import (
    BEVProjection,
    aperture_area_mm2,
    conformed_fluences,
    fit_aperture,
    make_conformed_beams,
    project_structure,
)

SAD = 1000.0


def phantom(n: int = 80, spacing: float = 1.0, **shapes) -> Patient:
    """A water cube of n^3 voxels centred on the origin (voxel edges on multiples of the
    spacing when n is even); ``shapes`` name -> f(x, y, z) -> bool; "T" is the target."""
    o = -(n - 1) * spacing / 2.0
    g = Grid((n, n, n), (spacing,) * 3, (o, o, o))
    c = g.voxel_centres_xyz()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    sts = [Structure("BODY", "external", np.ones(g.shape_zyx, bool), g)]
    for name, f in shapes.items():
        sts.append(Structure(name, "target" if name == "T" else "oar", f(x, y, z), g))
    return Patient(g, np.zeros(g.shape_zyx, np.float32), tuple(sts))


def one(p, **kw):
    """The beams at one gantry angle (an arc of length 0), isocentre at the origin."""
    kw.setdefault("isocentre_mm_xyz", (0.0, 0.0, 0.0))
    return make_conformed_beams(p, "T", length_deg=0.0, **kw)


def extent(proj: BEVProjection) -> tuple[float, float, float, float]:
    """(u_min, u_max, v_min, v_max) of the projection's cells (edges)."""
    cols = np.nonzero(proj.mask.any(axis=0))[0]
    rows = np.nonzero(proj.mask.any(axis=1))[0]
    u, v, h = proj.u_mm(), proj.v_mm(), proj.pitch_mm / 2
    return u[cols[0]] - h, u[cols[-1]] + h, v[rows[0]] - h, v[rows[-1]] + h


def box_corner_extent(s: Structure, beam: Beam) -> tuple[float, float, float, float]:
    """Extremes of the projected corners of the structure's voxel boxes (independent of the
    ray caster): the silhouette of the union of boxes reaches exactly these."""
    idx = np.argwhere(s.mask).astype(float)
    offs = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    uv = beam.patient_to_bev(s.grid.index_to_world((idx[:, None, :] + offs).reshape(-1, 3)))
    return uv[:, 0].min(), uv[:, 0].max(), uv[:, 1].min(), uv[:, 1].max()


@pytest.fixture(scope="module")
def sphere():
    return phantom(T=lambda x, y, z: x**2 + y**2 + z**2 <= 25.0**2)


# ------------------------------------------------------------------ areas against geometry
@pytest.mark.parametrize("gantry, couch, collimator", [(0, 0, 0), (33, 0, 17), (90, 40, 0), (215, 300, 75)])
def test_sphere_projection_area_is_the_analytic_disc(sphere, gantry, couch, collimator):
    R = 25.0

    def disc(r):  # the cone from the source tangent to a sphere of radius r, at the isocentre plane
        return np.pi * r**2 * SAD**2 / (SAD**2 - r**2)

    cb, = one(sphere, start_deg=gantry, couch_deg=couch, collimator_deg=collimator)
    # The voxels (1 mm boxes) whose centres lie in the sphere reach beyond it by at most half
    # a voxel's diagonal, sqrt(3)/2 mm: the projection lies between those two discs.
    assert disc(R) * 0.995 <= cb.area_mm2 <= disc(R + np.sqrt(3) / 2)
    # Leaf centres touching the disc: the aperture's area is the disc's to the 5 mm staircase.
    assert disc(R) * 0.98 <= cb.aperture_area_mm2 <= disc(R + np.sqrt(3) / 2) * 1.02


def test_box_jaws_and_leaves_by_hand():
    """A 40 mm cube at the isocentre, edges on voxel edges: its front face (20 mm towards the
    source) projects to +-20 * 1000 / 980 = +-20.41 mm; 5 mm leaves put leaf edges at +-20."""
    p = phantom(T=lambda x, y, z: (abs(x) < 20) & (abs(y) < 20) & (abs(z) < 20))
    half = 20.0 * SAD / (SAD - 20.0)
    got = {}
    for mode in ("inside", "centre", "outside"):
        cb, = one(p, leaf_mode=mode)
        got[mode] = cb
        assert cb.area_mm2 == pytest.approx((2 * half) ** 2, rel=0.015)
        assert cb.aperture.jaw_x_mm == pytest.approx((-half, half), abs=0.5)
    assert got["centre"].aperture.jaw_y_mm == (-20.0, 20.0)   # centre lines at +-22.5 miss the box
    assert got["inside"].aperture.jaw_y_mm == (-20.0, 20.0)
    assert got["outside"].aperture.jaw_y_mm == (-25.0, 25.0)  # the pairs the box reaches into
    assert got["centre"].aperture_area_mm2 == pytest.approx(40.0 * 2 * half, rel=0.015)


def test_projection_agrees_with_the_beams_own_transform():
    """Every voxel centre projects (Beam.patient_to_bev) into a cell of the projection, and the
    projection's extent is that of the projected voxel-box corners, at an arbitrary beam."""
    p = phantom(T=lambda x, y, z: ((x / 30) ** 2 + (y / 12) ** 2 + (z / 20) ** 2 <= 1) & (x + z < 25))
    t = p.structure("T")
    for g, c, k in [(20, 10, 35), (250, 0, 100)]:
        cb, = one(p, start_deg=g, couch_deg=c, collimator_deg=k)
        b, proj = cb.beam, cb.target_projection
        uv = b.patient_to_bev(t.grid.index_to_world(np.argwhere(t.mask)))
        rows, cols = (np.rint((uv[:, 1] - proj.origin_mm_uv[1]) / proj.pitch_mm).astype(int),
                      np.rint((uv[:, 0] - proj.origin_mm_uv[0]) / proj.pitch_mm).astype(int))
        assert proj.mask[rows, cols].all()
        np.testing.assert_allclose(extent(proj), box_corner_extent(t, b), atol=proj.pitch_mm)


# ------------------------------------------------------------------ the volume's margin
def test_margin_is_the_volumes_and_is_magnified_with_it():
    """A 20 x 10 x 20 mm box 300 mm towards the source from the isocentre: its 10 mm margin
    grows the volume, which then projects magnified (about 1.44 here), not by 10 mm in the
    isocentre plane as a margin of the projection would."""
    p = phantom(T=lambda x, y, z: (abs(x) < 10) & (abs(y) < 5) & (abs(z) < 10))
    iso = (0.0, 300.0, 0.0)  # posterior of the box: at gantry 0 the box lies 300 mm above the isocentre
    plain, = one(p, isocentre_mm_xyz=iso)
    grown, = one(p, isocentre_mm_xyz=iso, target_margin_mm=10.0)
    u0 = extent(plain.target_projection)[1]
    u1 = extent(grown.target_projection)[1]
    assert u0 == pytest.approx(10.0 * SAD / (SAD - 305.0), abs=0.5)
    assert u1 > u0 + 10.0 + 3.0  # a 2-D margin of the projection would give u0 + 10
    ref = box_corner_extent(expand("T+10", p.structure("T"), 10.0), grown.beam)
    np.testing.assert_allclose(extent(grown.target_projection), ref, atol=0.5)


def test_thin_slab_margin_grows_it_in_every_direction():
    """A 60 x 4 x 40 mm slab (thin antero-posteriorly) with a 5 mm margin: seen from the side
    (gantry 90) its projection is (4 + 10) x (40 + 10) mm magnified - it grew through its
    thickness and head to foot (a slice-by-slice margin would not grow it head to foot); at 45
    degrees the projection is wider than without the margin by the margin's projection."""
    p = phantom(n=100, T=lambda x, y, z: (abs(x) < 30) & (abs(y) < 2) & (abs(z) < 20))
    grown = {g: one(p, start_deg=g, target_margin_mm=5.0)[0] for g in (0, 45, 90)}
    plain = {g: one(p, start_deg=g)[0] for g in (0, 45, 90)}
    eu0, eu1, ev0, ev1 = extent(grown[90].target_projection)
    assert eu1 - eu0 == pytest.approx(14.0 * SAD / (SAD - 30.0), abs=1.0)
    assert ev1 - ev0 == pytest.approx(50.0 * SAD / (SAD - 35.0), abs=1.0)
    pu0, pu1, pv0, pv1 = extent(plain[90].target_projection)
    assert (ev1 - ev0) - (pv1 - pv0) == pytest.approx(10.0, abs=1.0)
    for g in (0, 45, 90):
        ref = box_corner_extent(expand("T+5", p.structure("T"), 5.0), grown[g].beam)
        np.testing.assert_allclose(extent(grown[g].target_projection), ref, atol=0.5)
        assert grown[g].area_mm2 > plain[g].area_mm2
    w45 = extent(grown[45].target_projection)
    c = np.cos(np.radians(45))
    assert w45[1] - w45[0] == pytest.approx(60 * c + 4 * c + 10, abs=1.5)  # Minkowski: width + 2 m


# ------------------------------------------------------------------ subtraction and pieces
@pytest.fixture(scope="module")
def split_case():
    return phantom(T=lambda x, y, z: (abs(x) < 30) & (abs(y) < 20) & (abs(z) < 20),
                   Rod=lambda x, y, z: abs(x) < 3)


def test_subtraction_splits_the_target_into_one_beam_per_piece(split_case):
    beams = make_conformed_beams(split_case, "T", avoid={"Rod": 0.0}, start_deg=0.0, length_deg=90.0,
                                 increment_deg=90.0, isocentre_mm_xyz=(0, 0, 0), leaf_mode="outside")
    # Gantry 0: the slab of the avoided volume runs along the beam and cuts the target in two;
    # gantry 90: it covers the whole target, so no beam.
    assert [b.beam.name for b in beams] == ["CF G0 a", "CF G0 b"]
    a, b = beams
    assert (a.piece, b.piece, a.n_pieces) == (0, 1, 2)
    assert a.aperture.jaw_x_mm[1] < 0 < b.aperture.jaw_x_mm[0]
    gap = b.aperture.jaw_x_mm[0] - a.aperture.jaw_x_mm[1]
    # The slab reaches the phantom's anterior edge, 40 mm towards the source: its widest shadow.
    assert gap == pytest.approx(6.0 * SAD / (SAD - 40.0), abs=1.0)  # two edges, each to a 0.5 mm cell
    for cb in beams:
        assert not (cb.projection.mask & cb.avoid_projection.mask).any()
        assert cb.area_mm2 == pytest.approx(cb.target_projection.area_mm2 / 2 - 3 * 40, rel=0.05)
    # A margin on the subtracted volume widens the gap by its magnified projection.
    wide = make_conformed_beams(split_case, "T", avoid=[("Rod", 4.0)], length_deg=0.0,
                                isocentre_mm_xyz=(0, 0, 0), leaf_mode="outside")
    gap4 = wide[1].aperture.jaw_x_mm[0] - wide[0].aperture.jaw_x_mm[1]
    assert gap4 - gap == pytest.approx(8.0 * SAD / (SAD - 40.0), abs=1.0)


def test_minimum_area_is_honoured_per_piece():
    p = phantom(T=lambda x, y, z: (abs(x) < 20) & (abs(y) < 20) & (abs(z) < 20),
                Cut=lambda x, y, z: (x > 15) & (x < 18))
    # Pieces at gantry 0: about 35 x 40 mm and 2 x 40 mm (80 mm^2).
    both = one(p, avoid=["Cut"], leaf_mode="outside")
    assert len(both) == 2 and both[1].area_mm2 < 120
    big = one(p, avoid=["Cut"], min_area_mm2=120.0)
    assert len(big) == 1 and big[0].n_pieces == 2 and big[0].area_mm2 > 1000
    assert big[0].beam.name == "CF G0"
    assert one(p, min_area_mm2=5000.0) == []
    small = phantom(T=lambda x, y, z: x**2 + y**2 + z**2 <= 6.0**2)
    area = one(small)[0].area_mm2
    assert one(small, min_area_mm2=area + 1) == [] and len(one(small, min_area_mm2=area)) == 1


# ------------------------------------------------------------------ leaves
def test_leaf_modes_nest_inside_centre_outside():
    p = phantom(T=lambda x, y, z: (x / 28) ** 2 + (y / 15) ** 2 + (z / 18) ** 2 <= 1)
    got = {m: one(p, start_deg=30, collimator_deg=20, leaf_mode=m)[0] for m in ("inside", "centre", "outside")}
    areas = [got[m].aperture_area_mm2 for m in ("inside", "centre", "outside")]
    assert areas[0] < areas[1] < areas[2]
    for inner, outer in (("inside", "centre"), ("centre", "outside")):
        a, b = got[inner].aperture, got[outer].aperture
        is_open = a.leaf_x2_mm > a.leaf_x1_mm
        assert is_open.any()
        assert np.all(b.leaf_x1_mm[is_open] <= a.leaf_x1_mm[is_open] + 1e-9)
        assert np.all(b.leaf_x2_mm[is_open] >= a.leaf_x2_mm[is_open] - 1e-9)
    # "inside" exposes nothing outside the projection, "outside" shields none of it.
    ins, out = got["inside"], got["outside"]
    assert ins.mismatch_mm2 == pytest.approx(ins.projection.area_mm2 - ins.aperture_area_mm2, abs=1e-6)
    assert out.mismatch_mm2 == pytest.approx(out.aperture_area_mm2 - out.projection.area_mm2, abs=1e-6)


def test_jaws_fit_the_open_leaves_and_closed_pairs_are_parked():
    p = phantom(T=lambda x, y, z: x**2 + y**2 + z**2 <= 15.0**2)
    cb, = one(p, leaf_mode="centre")
    ap = cb.aperture
    op = ap.leaf_x2_mm > ap.leaf_x1_mm
    edges = cb.mlc.leaf_boundaries_mm()
    k = np.nonzero(op)[0]
    assert ap.jaw_x_mm == (ap.leaf_x1_mm[op].min(), ap.leaf_x2_mm[op].max())
    assert ap.jaw_y_mm == (edges[k[0]], edges[k[-1] + 1])
    assert np.all(ap.leaf_x1_mm[~op] == ap.leaf_x2_mm[~op])


def test_aperture_clipped_to_the_maximum_field():
    mlc = MLC(name="small", leaf_widths_mm=(10.0,) * 4, max_field_mm=(30.0, 40.0))
    proj = BEVProjection(np.ones((60, 80), bool), 1.0, (-39.5, -29.5))  # 80 x 60 mm
    ap, _, clipped = fit_aperture(proj, mlc, "outside")
    assert clipped and ap.jaw_x_mm == (-15.0, 15.0) and ap.jaw_y_mm == (-20.0, 20.0)
    assert aperture_area_mm2(ap, mlc) == pytest.approx(30.0 * 40.0)
    assert fit_aperture(BEVProjection(np.zeros((3, 3), bool), 1.0, (0.5, 0.5)), mlc)[0] is None


def test_collimator_optimisation_turns_the_leaves_across_a_diagonal_bar():
    """A thin bar at 30 degrees in the coronal plane, seen at gantry 0: leaves fit it best
    when they move across it, i.e. Y_b along the bar: collimator 120 (Y_b = (-sin c, cos c))."""
    d = np.array([np.cos(np.radians(30)), np.sin(np.radians(30))])

    def bar(x, y, z):
        along = x * d[0] + z * d[1]
        across = -x * d[1] + z * d[0]
        return (abs(along) < 30) & (abs(across) < 3) & (abs(y) < 3)

    p = phantom(T=bar)
    best, = one(p, optimise_collimator=True, collimator_increment_deg=5.0)
    assert best.beam.collimator_deg in (115.0, 120.0, 125.0)
    for c in (0.0, 30.0, 60.0, 90.0):
        fixed, = one(p, collimator_deg=c)
        assert fixed.mismatch_mm2 > best.mismatch_mm2
    # The search's range and increment are the caller's.
    coarse, = one(p, optimise_collimator=True, collimator_increment_deg=45.0)
    assert coarse.beam.collimator_deg in (90.0, 135.0)


# ------------------------------------------------------------------ beams, names, errors
def test_arc_beams_names_and_settings(sphere):
    existing = [Beam("CF G40")]
    beams = make_conformed_beams(sphere, "T", start_deg=0, length_deg=360, increment_deg=40, couch_deg=10.0,
                                 energy_mv=10.0, existing=existing)
    assert [b.beam.gantry_deg for b in beams] == [0, 40, 80, 120, 160, 200, 240, 280, 320]
    assert beams[1].beam.name == "CF G40 (2)"
    t = sphere.structure("T")
    for cb in beams:
        assert cb.beam.couch_deg == 10.0 and cb.beam.energy_mv == 10.0 and cb.beam.fluence_grid is None
        np.testing.assert_allclose(cb.beam.isocentre_mm_xyz, t.centroid_xyz())
        assert cb.mlc == default_mlc()
        d = cb.to_dict()
        assert len(d["leaf_x1_mm"]) == 60 and d["projected_area_mm2"] > 0


def test_bad_requests_are_refused(sphere):
    with pytest.raises(ValueError, match="leaf_mode"):
        one(sphere, leaf_mode="middle")
    with pytest.raises(ValueError, match="is the target"):
        one(sphere, avoid=["T"])
    with pytest.raises(ValueError, match="margin"):
        one(sphere, avoid=[("BODY", -1.0)])
    with pytest.raises(ValueError, match="target_margin_mm"):
        one(sphere, target_margin_mm=-2)
    with pytest.raises(KeyError, match="no structure 'PTV'"):
        make_conformed_beams(sphere, "PTV")
    with pytest.raises(ValueError, match="collimator_increment"):
        one(sphere, optimise_collimator=True, collimator_increment_deg=0)
    empty = phantom(n=20, T=lambda x, y, z: x > 1e9)
    with pytest.raises(ValueError, match="empty"):
        one(empty)


def test_projection_of_an_empty_structure_is_empty(sphere):
    g = sphere.grid
    e = Structure("E", "oar", np.zeros(g.shape_zyx, bool), g)
    assert project_structure(e, Beam()).area_mm2 == 0.0


# ------------------------------------------------------------------ dose
def test_dose_of_conformal_beams_covers_the_target():
    from ids_engine.dose import DoseEngine

    p = phantom(n=50, spacing=3.0, T=lambda x, y, z: x**2 + y**2 + z**2 <= 20.0**2)
    beams = make_conformed_beams(p, "T", target_margin_mm=7.0, increment_deg=60.0, leaf_mode="outside")
    assert len(beams) == 6
    engine = DoseEngine(p, [cb.beam for cb in beams])
    fl = conformed_fluences(beams, engine.beams)
    for cb, f, b in zip(beams, fl, engine.beams):
        p2 = b.fluence_grid.pitch_mm ** 2
        open_ = float((f >= 0.999).sum()) * p2
        assert open_ == pytest.approx(cb.aperture_area_mm2, rel=0.1)
        assert float(f.sum()) * p2 >= cb.aperture_area_mm2 * 0.99  # plus leaf transmission
    engine.set_fluences(fl)
    dose = engine.dose_cube_host()
    t = p.structure("T").mask
    dose = dose / np.median(dose[t])
    assert np.percentile(dose[t], 5) > 0.93  # D95 > 93 % of the median
    # Far from the target (outside every aperture's shadow plus penumbra) the dose is low.
    c = p.grid.voxel_centres_xyz()
    far = np.linalg.norm(c, axis=-1) > 50.0
    assert np.mean(dose[far]) < 0.25
    with pytest.raises(ValueError, match="engine beams"):
        conformed_fluences(beams, engine.beams[:2])
    with pytest.raises(ValueError, match="fluence grid"):
        conformed_fluences(beams[:1], [beams[0].beam])


# ------------------------------------------------------------------ ids conform
def test_ids_conform_writes_beams_picture_and_dose(tmp_path, capsys):
    import json

    from ids_engine.cli import main

    out = tmp_path / "cf"
    rc = main(["conform", "tg119", "--resolution", "coarse", "--target", "OuterTarget", "--target-margin", "3",
               "--avoid", "Core:3", "--arc-start", "0", "--arc-length", "360", "--increment", "120",
               "--leaf-mode", "centre", "--min-area-cm2", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads((out / "beams.json").read_text())
    assert doc["settings"]["avoid"] == [{"name": "Core", "margin_mm": 3.0}]
    names = [b["name"] for b in doc["beams"]]
    # The core splits the C-shaped target's projection in two at every angle.
    assert names == ["CF G0 a", "CF G0 b", "CF G120 a", "CF G120 b", "CF G240 a", "CF G240 b"]
    for b in doc["beams"]:
        assert len(b["leaf_x1_mm"]) == 60 and b["projected_area_mm2"] >= 100 and b["mu"] > 0
    dose = json.loads((out / "dose_summary.json").read_text())
    assert dose["structures"]["OuterTarget"]["D50_gy"] == pytest.approx(60.0, abs=0.5)
    assert dose["structures"]["Core"]["mean_gy"] < 30.0
    assert "| CF G0 a | 0 |" in (out / "dose_summary.md").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "apertures.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, match", [
    (["--target", "PTV"], "no structure PTV"),
    (["--target", "OuterTarget", "--avoid", "OuterTarget"], "is the target"),
])
def test_ids_conform_errors_are_one_line(tmp_path, capsys, argv, match):
    from ids_engine.cli import main

    rc = main(["conform", "tg119", "--resolution", "coarse", *argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_ids_conform_argument_checks(capsys):
    from ids_engine.cli import main
    from ids_engine.cli_beams import parse_avoid

    assert parse_avoid("Core:3") == ("Core", 3.0) and parse_avoid("Core") == ("Core", 0.0)
    assert parse_avoid("a:b") == ("a:b", 0.0)
    for bad in (["--avoid", "Core:-2"], ["--arc-length", "400"], ["--increment", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["conform", "tg119", "--target", "OuterTarget", "--out", "x", *bad])
        assert exc.value.code == 2
    capsys.readouterr()
