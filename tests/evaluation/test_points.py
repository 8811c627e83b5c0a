"""Points (seed 001): the BEV frame, dose per point per beam, the point file, comparison with
measured doses and the Rando-phantom report."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from ids_engine.evaluation import (
    DuplicateLabelError,
    PointFileError,
    PointValue,
    add_point_in_bev,
    beam_dose_cubes,
    compare_points,
    comparison_report,
    normalise_label,
    point_doses,
    point_doses_report,
    point_from_bev,
    point_to_bev,
    rando_key,
    read_point_file,
    read_point_positions,
    write_point_file,
)
from ids_engine.model import Beam, PointOfInterest

SEED_EXAMPLE = """//Test Square     12-Dec-2000-09:19:19(hr:min:sec)

// Label          Dose in cGray

<* Example Label *> 1.299286

<* slice 10 row 4 column 7 *> 1.324436
"""


# --------------------------------------------------------------------------- BEV frame
def test_the_seeds_bev_axes_at_zero_angles_and_turned():
    """Seed: beam pointing at the floor, collimator 0: x across the couch left to right for
    someone at the foot looking at the gantry (the HFS patient's left, +x), y towards the
    gantry (the head, +z), z towards the source (anterior, -y); origin at the isocentre."""
    iso = (5.0, -3.0, 12.0)
    b = Beam("b", 0.0, isocentre_mm_xyz=iso)
    np.testing.assert_allclose(point_from_bev(b, (10, 0, 0)), np.add(iso, (10, 0, 0)), atol=1e-12)
    np.testing.assert_allclose(point_from_bev(b, (0, 10, 0)), np.add(iso, (0, 0, 10)), atol=1e-12)
    np.testing.assert_allclose(point_from_bev(b, (0, 0, 10)), np.add(iso, (0, -10, 0)), atol=1e-12)
    # Gantry 90 (IEC: clockwise seen from the foot): the source is at the patient's left.
    g90 = Beam("g90", 90.0, isocentre_mm_xyz=iso)
    np.testing.assert_allclose(point_from_bev(g90, (0, 0, 10)), np.add(iso, (10, 0, 0)), atol=1e-12)
    # The x and y axes turn with the collimator (90: x now along the old y).
    c90 = Beam("c90", 0.0, collimator_deg=90.0, isocentre_mm_xyz=iso)
    np.testing.assert_allclose(point_from_bev(c90, (10, 0, 0)), np.add(iso, (0, 0, 10)), atol=1e-12)
    # The source is at z = SAD.
    np.testing.assert_allclose(point_from_bev(g90, (0, 0, g90.sad_mm)), g90.source_mm_xyz(), atol=1e-9)


def test_bev_round_trip_at_any_angles(rng):
    for _ in range(20):
        g, c, t = rng.uniform(0, 360, 3)
        b = Beam("b", g, couch_deg=t, collimator_deg=c, isocentre_mm_xyz=tuple(rng.uniform(-50, 50, 3)))
        for pos in ("HFS", "FFP"):
            p = rng.uniform(-100, 100, (5, 3))
            np.testing.assert_allclose(point_from_bev(b, point_to_bev(b, p, pos), pos), p, atol=1e-9)


# --------------------------------------------------------------------------- doses
@pytest.fixture(scope="module")
def water_engine():
    from ids_engine.dose import DoseEngine
    from ids_engine.phantoms import PHANTOMS

    p = PHANTOMS["water"](resolution="coarse")
    beams = [Beam("AP", 0.0), Beam("PA", 180.0)]
    e = DoseEngine(p, beams)
    e.set_fluences([e.open_field(0, (-50, 50), (-50, 50), 100.0), e.open_field(1, (-50, 50), (-50, 50), 60.0)])
    return e


def test_dose_per_point_per_beam(water_engine):
    e = water_engine
    ap, pa = e.geometry[0].beam, e.geometry[1].beam
    pts = [PointOfInterest("iso", (0, 0, 0)),
           PointOfInterest("shallow AP", tuple(point_from_bev(ap, (0, 0, 40)))),
           PointOfInterest("deep AP", tuple(point_from_bev(ap, (0, 0, -40)))),
           PointOfInterest("outside field", (0, 0, 120.0))]
    d = point_doses(e, pts, plan_id=7)
    assert d.beam_names == ("AP", "PA") and d.per_beam_gy.shape == (4, 2)
    # The contributions add up to the engine's point dose.
    np.testing.assert_allclose(d.total_gy, np.asarray(e.dose_at_points(d.positions_mm_xyz)), rtol=1e-6)
    # 100 MU against 60 MU of the same field in a symmetric water box: at the isocentre the
    # AP beam gives 100/60 of the PA beam's dose.
    assert d.per_beam_gy[0, 0] / d.per_beam_gy[0, 1] == pytest.approx(100.0 / 60.0, rel=1e-4)
    # Mirror symmetry: the AP beam at 40 mm shallower equals the PA beam (scaled) at 40 mm deeper in its frame.
    assert d.per_beam_gy[1, 0] > d.per_beam_gy[0, 0] > d.per_beam_gy[2, 0]
    assert d.per_beam_gy[1, 0] * 0.6 == pytest.approx(d.per_beam_gy[2, 1], rel=1e-4)
    # 120 mm off axis on a 10 x 10 field: scatter only, under 5 % of the axis dose.
    assert d.per_beam_gy[3, 0] < 0.05 * d.per_beam_gy[0, 0]
    # BEV coordinates of each point in each beam.
    np.testing.assert_allclose(d.bev_mm_xyz[1, 0], (0, 0, 40), atol=1e-9)
    np.testing.assert_allclose(d.bev_mm_xyz[1, 1], (0, 0, -40), atol=1e-9)
    text = point_doses_report(d)
    assert "Plan ID: 7" in text and "| shallow AP |" in text and "AP Gy" in text
    # The patient's own points by default.
    assert point_doses(e).labels == ("ISO",)


def test_beam_dose_cubes_sum_to_the_plan_and_match_the_point_doses(water_engine):
    e = water_engine
    before = e.dose_cube_host().copy()
    cubes = beam_dose_cubes(e)
    np.testing.assert_allclose(sum(cubes), before, atol=1e-5 * before.max())
    np.testing.assert_array_equal(e.dose_cube_host(), before)  # the engine's plan is restored
    k = tuple(int(v) for v in e.grid.nearest_index((0.0, 0.0, 0.0)))
    d = point_doses(e, [PointOfInterest("c", tuple(e.grid.index_to_world(k)))])
    for b in range(2):
        assert cubes[b][k] == pytest.approx(d.per_beam_gy[0, b], rel=0.01)


def test_add_point_in_bev(water_engine):
    p = water_engine.patient
    beam = Beam("LAT", 90.0, isocentre_mm_xyz=(10.0, 0.0, 0.0))
    q = add_point_in_bev(p, beam, "lateral 30", (0.0, 0.0, 30.0))
    assert q.points[-1].label == "lateral 30"
    np.testing.assert_allclose(q.points[-1].position_mm_xyz, (40.0, 0.0, 0.0), atol=1e-9)
    with pytest.raises(DuplicateLabelError, match="'Lateral30'.*same after"):
        add_point_in_bev(q, beam, "Lateral30", (0, 0, 0))


def test_duplicate_point_labels_are_refused(water_engine):
    pts = [PointOfInterest("Rando 1", (0, 0, 0)), PointOfInterest("rando1", (10, 0, 0))]
    with pytest.raises(DuplicateLabelError, match="'Rando 1' and 'rando1'"):
        point_doses(water_engine, pts)


# --------------------------------------------------------------------------- files
def test_the_seeds_example_file_reads(tmp_path):
    f = tmp_path / "seed.txt"
    f.write_text(SEED_EXAMPLE)
    got = read_point_file(f)
    assert [(v.label, v.value) for v in got] == [("Example Label", 1.299286), ("slice 10 row 4 column 7", 1.324436)]
    assert read_point_file(f, scale=0.01)[0].value == pytest.approx(0.01299286)


def test_point_file_round_trip(tmp_path):
    values = [PointValue("Example Label", 1.2992864), ("slice 10 row 4 column 7", 1.3244358), ("x", 60.0)]
    f = write_point_file(tmp_path / "p.txt", values, title="Test Square", when=dt.datetime(2000, 12, 12, 9, 19, 19))
    text = f.read_text()
    assert text.splitlines()[0] == "//Test Square     12-Dec-2000-09:19:19(hr:min:sec)"
    assert "<* Example Label *> 1.299286\n" in text and "<* x *> 60.000000\n" in text
    back = read_point_file(f)
    assert [v.label for v in back] == ["Example Label", "slice 10 row 4 column 7", "x"]
    np.testing.assert_array_equal([v.value for v in back], [1.299286, 1.324436, 60.0])
    # What is read back writes back identically.
    f2 = write_point_file(tmp_path / "q.txt", back, title="Test Square", when=dt.datetime(2000, 12, 12, 9, 19, 19))
    assert f2.read_text() == text
    with pytest.raises(ValueError, match="cannot be written"):
        write_point_file(tmp_path / "r.txt", [("a *> b", 1.0)])


@pytest.mark.parametrize("line, message", [
    ("Example 1.0", "line 2: expected '<\\* label \\*> value'"),
    ("<* a *> 1.0 2.0", "line 2: point 'a' needs one value"),
    ("<* a *>", "line 2: point 'a' needs one value"),
    ("<* a *> one", "line 2: point 'a': 'one' is not a number"),
    ("<* a *> nan", "not finite"),
    ("<*  *> 1.0", "line 2: the label .* is empty"),
])
def test_bad_point_files_name_the_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.txt"
    f.write_text("// comment\n" + line + "\n")
    with pytest.raises(PointFileError, match=message) as info:
        read_point_file(f)
    assert str(f) in str(info.value)


def test_duplicate_labels_in_a_file_name_both_lines(tmp_path):
    f = tmp_path / "dup.txt"
    f.write_text("<* 11 1 1 *> 1.0\n// a comment\n<* 1 1 11 *> 2.0\n")
    with pytest.raises(DuplicateLabelError, match=r"'11 1 1' \(line 1\) and '1 1 11' \(line 3\)"):
        read_point_file(f)


def test_point_positions_file(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text("// label x y z (mm)\n<* 01 1 01 *> 0 -30 10.5\n<* iso *> 0 0 0\n")
    pts = read_point_positions(f)
    assert pts[0] == PointOfInterest("01 1 01", (0.0, -30.0, 10.5))
    f.write_text("<* a *> 0 0\n")
    with pytest.raises(PointFileError, match="3 numbers"):
        read_point_positions(f)


# --------------------------------------------------------------------------- comparison
def test_labels_match_lower_cased_without_spaces():
    assert normalise_label(" Slice 10  Row 4\tColumn 7 ") == "slice10row4column7"
    cmp = compare_points([("Slice 10 Row 4 Column 7", 2.0), ("iso", 1.0), ("extra", 3.0)],
                         [PointValue("slice10 row4 column7", 1.9), PointValue("ISO", 1.1), PointValue("m only", 1.0)])
    assert [(r.label, r.measured_label) for r in cmp.rows] == [("Slice 10 Row 4 Column 7", "slice10 row4 column7"),
                                                               ("iso", "ISO")]
    r = cmp.rows[0]
    assert r.difference_gy == pytest.approx(0.1) and r.difference_pct == pytest.approx(100 * 0.1 / 1.9)
    assert cmp.computed_only == ("extra",) and cmp.measured_only == ("m only",)
    with pytest.raises(DuplicateLabelError, match="measured points: labels 'A B' and 'ab'"):
        compare_points([("ab", 1.0)], [("A B", 1.0), ("ab", 2.0)])


def test_rando_report_sorted_by_slice_row_column():
    computed = [("10 1 1", 1.00), ("2 7 13", 1.50), ("2 1 3", 2.00), ("02 1 10", 1.2), ("centre", 3.0)]
    measured = [("10 1 1", 1.02), ("2 7 13", 1.40), ("2 1 3", 2.00), ("02 1 10", 1.25), ("centre", 2.9)]
    cmp = compare_points(computed, measured)
    assert [r.label for r in cmp.rows] == ["2 1 3", "02 1 10", "2 7 13", "10 1 1", "centre"]
    assert rando_key("slice 10 row 4 column 7") == (10, 4, 7) and rando_key("iso") is None
    text = comparison_report(cmp, plan_id=3)
    rows = [ln for ln in text.splitlines() if ln.startswith("| 2 7 13")]
    assert rows == ["| 2 7 13 | 2 | 7 | 13 | 1.5000 | 1.4000 m | +0.1000 | +7.14 |"]
    assert "Plan ID: 3" in text and "5 points matched" in text
    # The largest |difference| in % is the 2 7 13 point's +7.14 %.
    assert "largest +7.14 %" in text


# --------------------------------------------------------------------------- ids points
def test_ids_points_cli(tmp_path, capsys):
    from ids_engine.cli import main

    pos = tmp_path / "pos.txt"
    pos.write_text("// label x y z\n<* 01 1 01 *> 0 -30 10\n<* 2 1 1 *> 0 40 0\n")
    meas = tmp_path / "meas.txt"
    meas.write_text("// measured\n<* iso *> 6000\n<* 2 1 1 *> 5500\n<* 1 01 01 *> 1\n")
    out = tmp_path / "out"
    rc = main(["points", "horseshoe", "--beams", "3", "--positions", str(pos), "--bev-point", "ant=0:0,0,20",
               "--measured", str(meas), "--measured-unit", "cGy", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    values = read_point_file(out / "points.txt")
    assert [v.label for v in values] == ["ISO", "01 1 01", "2 1 1", "ant"]
    # The open-field plan is normalised to a median target dose of 60 Gy: the isocentre is near it.
    assert values[0].value == pytest.approx(60.0, rel=0.05)
    doc = (out / "points.json").read_text()
    import json

    d = json.loads(doc)
    ant = d["points"][3]
    np.testing.assert_allclose(ant["bev_mm_xyz"][0], (0, 0, 20), atol=1e-6)
    assert sum(ant["per_beam_gy"]) == pytest.approx(ant["total_gy"])
    # Measured in cGy, matched by label; "1 01 01" matches nothing ("01 1 01" normalises to "01101").
    cmp = (out / "comparison.md").read_text()
    assert "| 2 1 1 | 2 | 1 | 1 |" in cmp and "55.0000 m" in cmp and "Measured only (no computed point): 1 01 01" in cmp
    # A non-empty folder is refused without --force; bad input names itself.
    rc = main(["points", "horseshoe", "--out", str(out)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = main(["points", "horseshoe", "--bev-point", "a=B9:0,0,0", "--out", str(tmp_path / "o2")])
    assert rc == 2 and "no beam 'B9'" in capsys.readouterr().err
    meas.write_text("<* 11 1 1 *> 1\n<* 1 1 11 *> 2\n")
    rc = main(["points", "horseshoe", "--measured", str(meas), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "'11 1 1' (line 1) and '1 1 11' (line 2)" in capsys.readouterr().err
