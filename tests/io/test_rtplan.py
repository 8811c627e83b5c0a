"""DICOM RT Plan: our writer read back by our reader and by dicompyler-core, pydicom's
rtplan.dcm imported and its dose recomputed, truncated or inconsistent plans refused naming
the file and the field."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ids_engine.deliver import Aperture, DeliverablePlan, Segment, SequencedBeam
from ids_engine.dose import DoseEngine
from ids_engine.io import (
    RESEARCH_USE_ONLY,
    InputError,
    missing_required_attributes,
    plan_fluences,
    read_rtplan,
    write_rtplan,
)
from ids_engine.model import MLC, Beam, default_mlc
from ids_engine.phantoms import water_box

FRAME = "1.2.826.0.1.3680043.8.498.1"


def dicomparser():
    """dicompyler-core's parser, an independent reader (it still imports pydicom 2's read_file)."""
    pytest.importorskip("dicompylercore")
    import pydicom.dicomio

    if not hasattr(pydicom.dicomio, "read_file"):
        pydicom.dicomio.read_file = pydicom.dcmread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its pydicom 2 imports warn under pydicom 3
        from dicompylercore import dicomparser as parser
    return parser


def _aperture(mlc: MLC, x1: float, x2: float, jaw_y: tuple[float, float], *, shift_mm: float = 0.0) -> Aperture:
    """A rectangle open from x1 to x2 (pairs inside the Y jaws), a per-pair shift to make it irregular."""
    centres = mlc.leaf_centres_mm()
    inside = (centres > jaw_y[0]) & (centres < jaw_y[1])
    a = np.where(inside, x1 + shift_mm * np.arange(mlc.n_pairs) % 7, 0.0)
    b = np.where(inside, x2, 0.0)
    return Aperture(a, np.maximum(a, b), (x1, x2), jaw_y)


def hand_plan(mlc: MLC | None = None) -> DeliverablePlan:
    mlc = mlc or default_mlc()
    b1 = Beam("AP", gantry_deg=0, collimator_deg=10, couch_deg=0, isocentre_mm_xyz=(1.5, -2.0, 3.0), energy_mv=6)
    b2 = Beam("LAO", gantry_deg=40, collimator_deg=350, couch_deg=270, isocentre_mm_xyz=(1.5, -2.0, 3.0),
              energy_mv=10, sad_mm=1000)
    s1 = (Segment(_aperture(mlc, -40, 40, (-30, 30)), 20.0), Segment(_aperture(mlc, -20, 25, (-10, 15), shift_mm=1), 7.5),
          Segment(_aperture(mlc, -5, 5, (-5, 5)), 2.25))
    s2 = (Segment(_aperture(mlc, -30, 30, (-30, 30), shift_mm=2), 33.0),)
    return DeliverablePlan("hand plan", (SequencedBeam(b1, mlc, s1), SequencedBeam(b2, mlc, s2)), 50.0, 25)


@pytest.fixture
def written(tmp_path):
    plan = hand_plan()
    path = write_rtplan(plan, tmp_path / "RP.dcm", frame_of_reference_uid=FRAME, patient_position="HFS",
                        rtstruct_sop_instance_uid="1.2.3.4", target_roi_number=2)
    return plan, path


def test_round_trip_beams_segments_and_mu(written):
    plan, path = written
    imp = read_rtplan(path)
    assert imp.research_export and imp.notes == ()
    assert imp.frame_of_reference_uid == FRAME and imp.referenced_structure_set_uid == "1.2.3.4"
    got = imp.plan
    assert got.prescription_gy == pytest.approx(50.0) and got.fractions == 25
    assert len(got.beams) == 2
    for a, b in zip(plan.beams, got.beams):
        for f in ("gantry_deg", "collimator_deg", "couch_deg", "energy_mv", "sad_mm"):
            assert getattr(b.beam, f) == pytest.approx(getattr(a.beam, f)), f
        assert b.beam.isocentre_mm_xyz == pytest.approx(a.beam.isocentre_mm_xyz)
        assert b.mlc.leaf_boundaries_mm() == pytest.approx(a.mlc.leaf_boundaries_mm())
        assert len(b.segments) == len(a.segments)
        for sa, sb in zip(a.segments, b.segments):
            assert sb.mu == pytest.approx(sa.mu, rel=1e-8)
            assert sb.aperture.leaf_x1_mm == pytest.approx(sa.aperture.leaf_x1_mm)
            assert sb.aperture.leaf_x2_mm == pytest.approx(sa.aperture.leaf_x2_mm)
            assert sb.aperture.jaw_x_mm == pytest.approx(sa.aperture.jaw_x_mm)
            assert sb.aperture.jaw_y_mm == pytest.approx(sa.aperture.jaw_y_mm)


def test_written_plan_has_the_required_attributes_and_dicom_meaning(written):
    plan, path = written
    ds = pydicom.dcmread(path)
    assert missing_required_attributes(ds) == []
    assert ds.ApprovalStatus == "UNAPPROVED" and ds.RTPlanDescription == RESEARCH_USE_ONLY
    assert ds.RTPlanGeometry == "PATIENT"
    assert ds.DoseReferenceSequence[0].ReferencedROINumber == 2
    assert float(ds.DoseReferenceSequence[0].TargetPrescriptionDose) == 50.0
    group = ds.FractionGroupSequence[0]
    assert group.NumberOfFractionsPlanned == 25 and group.NumberOfBeams == 2
    assert [float(r.BeamMeterset) for r in group.ReferencedBeamSequence] == pytest.approx([29.75, 33.0])
    beam = ds.BeamSequence[0]
    mlcx = [d for d in beam.BeamLimitingDeviceSequence if d.RTBeamLimitingDeviceType == "MLCX"][0]
    assert mlcx.NumberOfLeafJawPairs == 60 and len(mlcx.LeafPositionBoundaries) == 61
    # Step-and-shoot: 2 control points per segment, cumulative weights 0, w1, w1, w1+w2, ... 1.
    assert beam.NumberOfControlPoints == 6 == len(beam.ControlPointSequence)
    weights = [float(cp.CumulativeMetersetWeight) for cp in beam.ControlPointSequence]
    assert weights == pytest.approx([0, 20 / 29.75, 20 / 29.75, 27.5 / 29.75, 27.5 / 29.75, 1.0])
    cp0 = beam.ControlPointSequence[0]
    assert float(cp0.BeamLimitingDeviceAngle) == 10 and float(cp0.GantryAngle) == 0
    leaves = [d for d in cp0.BeamLimitingDevicePositionSequence if d.RTBeamLimitingDeviceType == "MLCX"][0]
    assert len(leaves.LeafJawPositions) == 120
    # Bank B (x1, -X) first, then bank A.
    assert [float(v) for v in leaves.LeafJawPositions[:60]] == pytest.approx(plan.beams[0].segments[0].aperture.leaf_x1_mm)


def test_dicompyler_core_reads_our_plan(written):
    parser = dicomparser()
    _, path = written
    p = parser.DicomParser(str(path))
    assert p.GetPlan()["rxdose"] == 5000  # cGy
    beams = p.GetReferencedBeamsInFraction()
    assert [b["name"] for b in beams.values()] == ["AP", "LAO"]


def test_pydicom_rtplan_imports_and_its_dose_matches_the_planning_system():
    imp = read_rtplan(get_testdata_file("rtplan.dcm"))
    plan = imp.plan
    assert plan.fractions == 30 and plan.prescription_gy == pytest.approx(30.826203)
    assert len(plan.beams) == 1
    sb = plan.beams[0]
    assert sb.beam.gantry_deg == 0 and sb.beam.energy_mv == 6
    assert sb.beam.isocentre_mm_xyz == pytest.approx((235.711172833292, 244.135437110782, -724.97815409918))
    assert sb.mu == pytest.approx(116.0036697) and len(sb.segments) == 1
    ap = sb.segments[0].aperture
    assert ap.jaw_x_mm == (-100, 100) and ap.jaw_y_mm == (-100, 100)
    assert any("no MLC" in n for n in imp.notes) and not imp.research_export
    # Recompute on water at the plan's SSD (898.4 mm): 116 MU of a 20 x 20 cm field; the
    # planning system's BeamDose at the dose specification point (the isocentre) is 1.0275 Gy.
    ssd = 898.429664831309
    iso = (0.0, -150.0 + (1000.0 - ssd), 0.0)
    moved = dataclasses.replace(plan, beams=(dataclasses.replace(sb, beam=dataclasses.replace(sb.beam, isocentre_mm_xyz=iso)),))
    engine = DoseEngine(water_box("coarse"), [moved.beams[0].beam])
    engine.set_fluences(plan_fluences(moved, [g.fluence_grid for g in engine.geometry]))
    per_fraction = float(np.asarray(engine.dose_at_points(np.array([iso]))).ravel()[0]) / plan.fractions
    assert per_fraction == pytest.approx(1.0275401, rel=0.03)


# ------------------------------------------------------------------ bad plans
def _edit(tmp_path, edit, source=None):
    ds = pydicom.dcmread(source or get_testdata_file("rtplan.dcm"))
    edit(ds)
    path = tmp_path / "bad.dcm"
    ds.save_as(path)
    return path


def _raises(path, field):
    with pytest.raises(InputError) as err:
        read_rtplan(path)
    assert err.value.path == str(path) and err.value.field == field, str(err.value)
    assert "bad.dcm" in str(err.value)
    return err.value


def test_missing_control_point_is_refused(tmp_path):
    path = _edit(tmp_path, lambda ds: ds.BeamSequence[0].ControlPointSequence.pop())
    e = _raises(path, "BeamSequence[0].NumberOfControlPoints")
    assert "2 declared, 1 items" in e.message


def test_control_points_out_of_order_are_refused(tmp_path):
    def edit(ds):
        beam = ds.BeamSequence[0]
        beam.ControlPointSequence[1].ControlPointIndex = 2
    _raises(_edit(tmp_path, edit), "BeamSequence[0].ControlPointSequence[1].ControlPointIndex")


def test_decreasing_meterset_weights_are_refused(written, tmp_path):
    def edit(ds):
        cps = ds.BeamSequence[0].ControlPointSequence
        cps[3].CumulativeMetersetWeight = "0.1"
    _raises(_edit(tmp_path, edit, written[1]), "BeamSequence[0].ControlPointSequence[3].CumulativeMetersetWeight")


def test_final_weight_not_reached_is_refused(tmp_path):
    def edit(ds):
        ds.BeamSequence[0].FinalCumulativeMetersetWeight = "2"
    _raises(_edit(tmp_path, edit), "BeamSequence[0].FinalCumulativeMetersetWeight")


def test_leaf_count_not_matching_the_boundaries_is_refused(written, tmp_path):
    def boundaries(ds):
        d = ds.BeamSequence[1].BeamLimitingDeviceSequence[2]
        d.LeafPositionBoundaries = d.LeafPositionBoundaries[:-1]
    e = _raises(_edit(tmp_path, boundaries, written[1]), "BeamSequence[1].BeamLimitingDeviceSequence[2].LeafPositionBoundaries")
    assert "60 boundaries for 60 leaf pairs" in e.message

    def leaves(ds):
        item = ds.BeamSequence[0].ControlPointSequence[2].BeamLimitingDevicePositionSequence[2]
        item.LeafJawPositions = item.LeafJawPositions[:-2]
    _raises(_edit(tmp_path, leaves, written[1]),
            "BeamSequence[0].ControlPointSequence[2].BeamLimitingDevicePositionSequence[2].LeafJawPositions")


def test_crossing_leaves_and_missing_meterset_are_refused(written, tmp_path):
    def cross(ds):
        item = ds.BeamSequence[0].ControlPointSequence[0].BeamLimitingDevicePositionSequence[2]
        values = [float(v) for v in item.LeafJawPositions]
        values[30] = values[90] + 5
        item.LeafJawPositions = values
    e = _raises(_edit(tmp_path, cross, written[1]),
                "BeamSequence[0].ControlPointSequence[0].BeamLimitingDevicePositionSequence[2].LeafJawPositions")
    assert "pair 31" in e.message

    def no_meterset(ds):
        del ds.FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset
    _raises(_edit(tmp_path, no_meterset), "FractionGroupSequence[0].ReferencedBeamSequence[0].BeamMeterset")

    def lost_beam(ds):
        ds.FractionGroupSequence[0].ReferencedBeamSequence[0].ReferencedBeamNumber = 7
    _raises(_edit(tmp_path, lost_beam), "BeamSequence")


def test_arcs_and_truncated_files_are_refused(tmp_path):
    def arc(ds):
        ds.BeamSequence[0].ControlPointSequence[1].GantryAngle = "30"
    _raises(_edit(tmp_path, arc), "BeamSequence[0].ControlPointSequence[1].GantryAngle")
    truncated = get_testdata_file("rtplan_truncated.dcm")
    with pytest.raises(InputError, match="rtplan_truncated.dcm"):
        read_rtplan(truncated)
    with pytest.raises(InputError, match="Modality"):
        read_rtplan(get_testdata_file("rtdose.dcm"))


def test_moving_leaves_between_control_points_use_the_mean_aperture(written, tmp_path):
    def dynamic(ds):
        cps = ds.BeamSequence[1].ControlPointSequence  # one segment, control points 0 and 1
        moved = pydicom.dataset.Dataset()
        moved.RTBeamLimitingDeviceType = "MLCX"
        values = [float(v) for v in cps[0].BeamLimitingDevicePositionSequence[2].LeafJawPositions]
        moved.LeafJawPositions = [v - 10 if i < 60 else v for i, v in enumerate(values)]
        cps[1].BeamLimitingDevicePositionSequence = pydicom.sequence.Sequence([moved])
    imp = read_rtplan(_edit(tmp_path, dynamic, written[1]))
    seg = imp.plan.beams[1].segments
    assert len(seg) == 1 and seg[0].mu == pytest.approx(33.0)
    x1 = written[0].beams[1].segments[0].aperture.leaf_x1_mm
    assert seg[0].aperture.leaf_x1_mm == pytest.approx(x1 - 5)
    assert any("dynamic" in n for n in imp.notes)
