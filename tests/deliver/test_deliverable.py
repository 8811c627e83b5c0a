"""Deliverable dose: tongue-and-groove fluence, the segments' dose influence, re-optimised MU."""

import dataclasses

import numpy as np
import pytest

from ids_engine import backend
from ids_engine.deliver import (
    Aperture,
    Segment,
    aperture_fluence,
    check_deliverable,
    deliverable_fluences,
    reoptimise_weights,
    segment_fluence,
    segment_influence,
    sequence_plan,
)
from ids_engine.dose import DoseEngine
from ids_engine.model import MLC, FluenceGrid, Structure, default_mlc
from ids_engine.phantoms import water_box
from ids_engine.phantoms._boxes import broadcast_axes
from ids_engine.planning import conformal_aperture, equispaced_beams


# ------------------------------------------------------------------ tongue and groove
def _two_pair_aperture(x1_lower, x2_lower, x1_upper, x2_upper):
    """Default MLC: pair 29 spans Y_b -5..0 mm, pair 30 0..5 mm; the other pairs open on
    -10..10 mm behind the Y jaws (-5..5 mm). (A closed neighbour behind a jaw would shadow
    the strip along the jaw edge too: its tongue still reaches under the open leaf.)"""
    x1 = np.full(60, -10.0)
    x2 = np.full(60, 10.0)
    x1[29], x2[29], x1[30], x2[30] = x1_lower, x2_lower, x1_upper, x2_upper
    return Aperture(x1, x2, (-20.0, 20.0), (-5.0, 5.0))


def test_tongue_and_groove_shadows_only_where_one_pair_is_closed():
    mlc = MLC(transmission=0.0)
    grid = FluenceGrid((20, 60), 0.5, (-14.75, -4.75))  # cell edges on whole and half mm
    # Both pairs open on -10..10: no shadow.
    ap = _two_pair_aperture(-10, 10, -10, 10)
    np.testing.assert_allclose(segment_fluence(ap, mlc, grid, tongue_groove_mm=1.0), aperture_fluence(ap, mlc, grid))
    # The lower pair open on -10..10, the upper on 0..10: on -10..0 the lower pair's 0.5 mm
    # half-strip at the boundary is shadowed: 10 mm x 0.5 mm = 5 mm^2 = 20 cells of 0.25 mm^2.
    ap = _two_pair_aperture(-10, 10, 0, 10)
    plain = aperture_fluence(ap, mlc, grid)
    tg = segment_fluence(ap, mlc, grid, tongue_groove_mm=1.0)
    assert (plain.sum() - tg.sum()) * 0.25 == pytest.approx(5.0)
    lost = plain - tg
    v = grid.v_mm()
    u = grid.u_mm()
    assert np.all(lost[(v > -0.5) & (v < 0)][:, (u > -10) & (u < 0)] == pytest.approx(1.0))
    assert lost[:, u > 0].max() == pytest.approx(0.0)
    # Zero width: the plain aperture fluence; with transmission the shadow keeps it.
    np.testing.assert_allclose(segment_fluence(ap, mlc, grid, tongue_groove_mm=0.0), plain)
    t = MLC(transmission=0.02)
    diff = aperture_fluence(ap, t, grid).sum() - segment_fluence(ap, t, grid, tongue_groove_mm=1.0).sum()
    assert diff * 0.25 == pytest.approx(5.0 * 0.98, rel=1e-5)
    with pytest.raises(ValueError, match="tongue_groove_mm"):
        segment_fluence(ap, mlc, grid, tongue_groove_mm=-1)


def test_leaf_gap_widens_every_open_pair_inside_the_jaws():
    mlc = MLC(transmission=0.0)
    grid = FluenceGrid((20, 60), 0.5, (-14.75, -4.75))
    ap = _two_pair_aperture(-10, 10, 0, 10)  # jaws X -20..20, Y -5..5: pairs 29 and 30 in the field
    plain = segment_fluence(ap, mlc, grid, tongue_groove_mm=0.0)
    wide = segment_fluence(ap, mlc, grid, tongue_groove_mm=0.0, leaf_gap_mm=2.0)
    # Each of the two pairs in the field opens 1 mm more at each end: 2 mm x 5 mm per pair.
    assert (wide.sum() - plain.sum()) * 0.25 == pytest.approx(2 * 2.0 * 5.0)
    u = grid.u_mm()
    assert wide[5, (u > -11) & (u < -10)] == pytest.approx(1.0)  # pair 29's B tip moved to -11
    with pytest.raises(ValueError, match="leaf_gap_mm"):
        segment_fluence(ap, mlc, grid, leaf_gap_mm=-1)


# ------------------------------------------------------------------ a small water case
@pytest.fixture(scope="module")
def case():
    p = water_box("coarse", size_mm=(100.0, 100.0, 100.0))  # 5 mm voxels, 24^3
    x, y, z = broadcast_axes(p.grid)
    target = (np.abs(x) <= 20) & (np.abs(y) <= 20) & (np.abs(z) <= 20)
    p = dataclasses.replace(p, structures=p.structures + (Structure("PTV", "target", target, p.grid),))
    engine = DoseEngine(p, equispaced_beams(3, (0.0, 0.0, 0.0)))
    fluences = []
    for g in engine.geometry:
        fg = g.beam.fluence_grid
        uu, vv = np.meshgrid(fg.u_mm(), fg.v_mm())
        ap = conformal_aperture(g.beam, p, p.targets[0], 5.0)
        fluences.append((ap * (50 + 20 * np.sin(uu / 8) + 10 * np.cos(vv / 6))).astype(np.float32))
    engine.set_fluences(fluences)
    plan = sequence_plan([g.beam for g in engine.geometry], fluences, default_mlc(), levels=5, min_mu=1.0,
                         prescription_gy=1.0)
    return engine, fluences, plan


def test_segment_influence_is_the_engine_dose_of_the_segments(case):
    engine, fluences, plan = case
    idx = np.flatnonzero(engine.patient.body_mask().ravel())[::7]
    A = segment_influence(engine, plan, idx, tongue_groove_mm=1.0)
    w = np.array([s.mu for sb in plan.beams for s in sb.segments])
    try:
        engine.set_fluences(deliverable_fluences(plan, tongue_groove_mm=1.0))
        direct = backend.asnumpy(engine.dose_at_voxels(idx))
    finally:
        engine.set_fluences(fluences)
    np.testing.assert_allclose(A @ w, direct, atol=1e-4 * direct.max())
    other = dataclasses.replace(plan, beams=plan.beams[:2])
    with pytest.raises(ValueError, match="2 beams, the dose engine 3"):
        segment_influence(engine, other, idx)


def test_reoptimisation_recovers_scaled_weights(case):
    engine, fluences, plan = case
    ref_plan_dose = None
    try:
        engine.set_fluences(deliverable_fluences(plan))
        ref_plan_dose = engine.dose_cube_host()
    finally:
        engine.set_fluences(fluences)
    # The sequenced plan's own dose is the goal; its MU scaled by 0.8 are to be found again.
    low = dataclasses.replace(plan, beams=tuple(
        dataclasses.replace(sb, segments=tuple(Segment(s.aperture, 0.8 * s.mu) for s in sb.segments))
        for sb in plan.beams))
    back, info = reoptimise_weights(engine, low, ref_plan_dose, min_mu=0.0, sample_voxels=1500)
    assert info["rms_after_gy"] < 0.02 * info["rms_before_gy"]
    for a, b in zip(plan.beams, back.beams):
        np.testing.assert_allclose([s.mu for s in b.segments], [s.mu for s in a.segments], rtol=0.02)
    # The minimum MU bounds every segment.
    bounded, _ = reoptimise_weights(engine, low, ref_plan_dose, min_mu=30.0, sample_voxels=500)
    assert min(s.mu for sb in bounded.beams for s in sb.segments) >= 30.0 - 1e-9


def test_segments_held_at_the_minimum_are_pruned(case):
    engine, fluences, plan = case
    engine.set_fluences(deliverable_fluences(plan))
    ref = engine.dose_cube_host()
    engine.set_fluences(fluences)
    # A stray segment: one leaf pair open far off the target, 5 MU. The fit wants 0 MU there,
    # the bound holds it at the 1 MU minimum, so it is removed.
    x1 = np.full(60, -0.25)
    x2 = np.full(60, 0.25)
    x1[30], x2[30] = 40.0, 45.0
    stray = Aperture(x1, x2, (40.0, 45.0), (0.0, 5.0))
    b0 = plan.beams[0]
    extra = dataclasses.replace(plan, beams=(dataclasses.replace(b0, segments=b0.segments + (Segment(stray, 5.0),)),)
                                + plan.beams[1:])
    kept, info_kept = reoptimise_weights(engine, extra, ref, min_mu=1.0, sample_voxels=800, prune_tolerance=None)
    assert [s.mu for s in kept.beams[0].segments][-1] == pytest.approx(1.0)
    pruned, info = reoptimise_weights(engine, extra, ref, min_mu=1.0, sample_voxels=800)
    assert info["segments_removed"] >= 1
    assert all(s.aperture is not stray for s in pruned.beams[0].segments)
    assert info["rms_after_gy"] <= info_kept["rms_after_gy"] * 1.01
    assert all(len(sb.segments) >= 1 for sb in pruned.beams)


def test_check_closes_the_gap_and_reports(case):
    engine, fluences, plan = case
    chk = check_deliverable(engine, plan, gamma_points=800, sample_voxels=800, options={"levels": 5, "method": "engel"})
    for f0, f1 in zip(fluences, engine.fluences_host()):  # the engine's plan is restored
        np.testing.assert_array_equal(f0, f1)
    seq, re = chk.gamma["sequenced"], chk.gamma["re-optimised"]
    # Five levels of a smooth modulation: the sequenced dose is close, the re-optimised closer.
    assert seq["3%/3mm"]["pass_rate_pct"] >= 90.0
    assert re["2%/2mm"]["pass_rate_pct"] >= seq["2%/2mm"]["pass_rate_pct"]
    assert chk.reoptimisation["rms_after_gy"] < chk.reoptimisation["rms_before_gy"]
    assert np.abs(chk.reoptimised_gy - chk.reference_gy).max() < np.abs(chk.sequenced_gy - chk.reference_gy).max()
    md = chk.to_markdown()
    assert "| B1 G0 |" in md and "3%/3mm" in md and "2%/2mm" in md and "| PTV | D95 |" in md
    assert [r["segments"] for r in chk.beam_rows()] == [len(sb.segments) for sb in plan.beams]


# ------------------------------------------------------------------ ids sequence
def test_cli_sequence_on_a_saved_session(tmp_path, capsys):
    import json

    from ids_engine.cli import main
    from ids_engine.session import Session, case_from_spec

    spec = {"phantom": "water", "resolution": "coarse"}
    p = case_from_spec(spec)
    beams = equispaced_beams(2, (0.0, 0.0, 0.0))
    with Session(p, beams, prescription_gy=2.0, case=spec) as s:
        maps = []
        for g in s.engine.geometry:
            fg = g.beam.fluence_grid
            uu, vv = np.meshgrid(fg.u_mm(), fg.v_mm())
            maps.append(((np.abs(uu) <= 30) & (np.abs(vv) <= 20)) * (100.0 + uu).astype(np.float32))
        s.set_plan(maps)
        s.save(tmp_path / "session")
    out = tmp_path / "seq"
    rc = main(["sequence", str(tmp_path / "session"), "--out", str(out), "--levels", "4", "--gamma-points", "300",
               "--no-reoptimise"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "segments.json").read_text())
    assert [b["name"] for b in doc["beams"]] == [b.name for b in beams]
    seg = doc["beams"][0]["segments"][0]
    assert len(seg["leaf_x1_mm"]) == 60 and "mu_reoptimised" not in seg
    # A ramp of 70..130 MU in 4 levels of its peak: the MU of a beam are its peak (the last
    # 2.5 mm bixel's mean, 129 MU) as the ramp only rises along each row.
    assert doc["beams"][0]["mu"] == pytest.approx(129.0, abs=1.0)
    assert (out / "deliverable_report.md").read_text().startswith("# Deliverable dose check")
    assert len(list(out.glob("segments_*.png"))) == 2
    # Refusals: the same non-empty folder, an unknown source.
    assert main(["sequence", str(tmp_path / "session"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["sequence", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a session folder" in capsys.readouterr().err
