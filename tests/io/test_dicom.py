"""DICOM round trips: CT, RT Structure Set and RT Dose written here and read back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ids_engine.io._dicom import (
    read_ct_series,
    read_dicom,
    read_rtdose,
    read_rtstruct,
    write_dicom_ct,
    write_rtdose,
    write_rtstruct,
)
from ids_engine.model import Grid, Patient, Structure, StructureKind

GRID = Grid((20, 40, 40), (3.0, 2.0, 2.0), (-39.0, -39.0, -28.5))


def make_patient() -> Patient:
    """A 40 x 40 x 20 phantom: body, a spherical target, a box OAR with a ring-shaped
    cross-section on slices 8..12, two lungs (two contours per slice) and two voxels
    touching at a corner."""
    c = GRID.voxel_centres_xyz()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    body = (x / 34.0) ** 2 + (y / 28.0) ** 2 < 1.0
    ct = np.where(body, 20.0 + 35.25 * np.sin(x / 7.0) * np.cos(y / 9.0), -1000.0)
    ct = np.where(body & (np.hypot(x + 5.0, y - 15.0) < 4.0), 950.5, ct).astype(np.float32)
    ptv = np.linalg.norm(c - np.array([5.0, 0.0, 0.0]), axis=-1) < 12.0
    cord = (x > -30) & (x < -14) & (np.abs(y) < 10)
    k = np.arange(GRID.shape_zyx[0])[:, None, None]
    cord &= ~((x > -26) & (x < -18) & (np.abs(y) < 6) & (k >= 8) & (k <= 12))
    lungs = ((x > 14) & (x < 22) | (x > 25) & (x < 31)) & (np.abs(y) < 8) & (np.abs(z) < 20)
    diag = np.zeros(GRID.shape_zyx, dtype=bool)
    diag[10, 5, 25] = diag[10, 6, 26] = True
    structures = (
        Structure("BODY", StructureKind.EXTERNAL, body, GRID, (0.6, 0.6, 0.6)),
        Structure("PTV", StructureKind.TARGET, ptv, GRID, (1.0, 0.0, 0.0)),
        Structure("Cord", StructureKind.OAR, cord, GRID, (0.0, 0.0, 1.0)),
        Structure("Lungs", StructureKind.OAR, lungs, GRID, (0.0, 1.0, 0.5)),
        Structure("Diag", StructureKind.OAR, diag, GRID, (1.0, 1.0, 0.0)),
    )
    return Patient(GRID, ct, structures, name="phantom", patient_position="HFS",
                   frame_of_reference_uid=pydicom.uid.generate_uid())


def write_case(folder: Path, patient: Patient | None = None) -> tuple[Patient, list[Path], Path]:
    """Write CT slices and RS.dcm into ``folder``."""
    patient = patient or make_patient()
    files = write_dicom_ct(patient, folder, patient_name="Doe^John", patient_id="PID-QXZ-4711")
    rs = write_rtstruct(patient, folder / "RS.dcm", files)
    return patient, files, rs


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom_case")
    patient, files, rs = write_case(folder)
    return patient, folder, files, rs


def _assert_within_one_voxel(got: np.ndarray, want: np.ndarray) -> None:
    """Differences only next to the boundary; volume within 3 %."""
    diff = got ^ want
    edge = want ^ ndimage.binary_erosion(want, border_value=0)
    edge = ndimage.binary_dilation(edge, iterations=1)
    assert not np.any(diff & ~edge)
    assert abs(int(got.sum()) - int(want.sum())) <= 0.03 * want.sum()


# ----------------------------------------------------------------------- CT
def test_ct_round_trip(case):
    patient, folder, files, _ = case
    grid, ct_hu, meta = read_ct_series(folder)
    assert grid == patient.grid
    assert ct_hu.dtype == np.float32 and ct_hu.shape == grid.shape_zyx
    assert np.max(np.abs(ct_hu - patient.ct_hu)) <= 0.5 + 1e-4  # rounding to whole HU
    assert meta["frame_of_reference_uid"] == patient.frame_of_reference_uid
    assert meta["patient_position"] == "HFS"
    assert meta["files"] == [str(p) for p in files]
    assert len(set(meta["sop_instance_uids"])) == grid.shape_zyx[0]


def test_ct_reads_shuffled_explicit_paths_and_skips_other_files(case, tmp_path):
    patient, folder, files, _ = case
    shuffled = [files[i] for i in np.random.default_rng(3).permutation(len(files))]
    grid, ct_hu, _ = read_ct_series(shuffled)
    assert grid == patient.grid
    assert np.max(np.abs(ct_hu - patient.ct_hu)) <= 0.5 + 1e-4

    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "README.txt").write_text("notes, not DICOM")
    write_rtdose(np.ones(GRID.shape_zyx), GRID, mixed / "RD.dcm", patient.frame_of_reference_uid)
    grid2, _, meta = read_ct_series(mixed)
    assert grid2 == patient.grid and len(meta["files"]) == 20


def test_ct_large_range_uses_a_larger_slope(tmp_path):
    patient = make_patient()
    ct = patient.ct_hu.copy()
    ct[0, 0, 0] = 60000.0
    files = write_dicom_ct(Patient(GRID, ct), tmp_path)
    _, ct_hu, _ = read_ct_series(files)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert slope > 1
    assert np.max(np.abs(ct_hu - ct)) <= slope / 2 + 1e-3


def test_writes_leave_no_temporary_files_and_ordinary_permissions(case, tmp_path):
    _, folder, files, rs = case
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # a file created the ordinary way (umask applied)
    assert {f.stat().st_mode & 0o777 for f in [*files, rs]} == {plain.stat().st_mode & 0o777}


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", broken)
    with pytest.raises(OSError, match="disk full"):
        write_rtdose(np.ones(GRID.shape_zyx), GRID, tmp_path / "RD.dcm", "1.2.3")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ RTSTRUCT
def test_structures_round_trip_exactly(case):
    patient, _, _, rs = case
    structures = read_rtstruct(rs, patient.grid, patient.frame_of_reference_uid)
    assert [s.name for s in structures] == list(patient.structure_names)
    for got, want in zip(structures, patient.structures):
        assert got.kind is want.kind
        assert np.allclose(got.colour, want.colour, atol=1 / 255)
        # Contours along voxel edges reproduce the mask exactly (a fortiori within a voxel).
        assert np.array_equal(got.mask, want.mask), got.name
        _assert_within_one_voxel(got.mask, want.mask)
    assert structures[1].meta["interpreted_type"] == "PTV"


def test_ring_and_two_islands_are_separate_contours(case):
    patient, _, _, rs = case
    ds = pydicom.dcmread(rs)
    number = {r.ROIName: r.ROINumber for r in ds.StructureSetROISequence}
    by_roi = {c.ReferencedROINumber: c for c in ds.ROIContourSequence}
    z_of = lambda c: float(c.ContourData[2])  # noqa: E731
    z10 = GRID.axis_mm("z")[10]
    cord10 = [c for c in by_roi[number["Cord"]].ContourSequence if abs(z_of(c) - z10) < 1e-6]
    lungs10 = [c for c in by_roi[number["Lungs"]].ContourSequence if abs(z_of(c) - z10) < 1e-6]
    diag10 = [c for c in by_roi[number["Diag"]].ContourSequence if abs(z_of(c) - z10) < 1e-6]
    assert len(cord10) == 2  # outer boundary and hole
    assert len(lungs10) == 2  # two islands
    assert len(diag10) == 2  # corner-touching voxels: two simple squares
    assert all(c.ContourGeometricType == "CLOSED_PLANAR" for c in cord10 + lungs10)
    sop_uids = {pydicom.dcmread(p).SOPInstanceUID for p in case[2]}
    assert cord10[0].ContourImageSequence[0].ReferencedSOPInstanceUID in sop_uids


def test_smooth_contours_fill_at_voxel_centres(case, tmp_path):
    """A third-party style structure set: circles with many vertices, not voxel edges."""
    patient, _, _, rs = case
    ds = pydicom.dcmread(rs)
    item = next(c for c, r in zip(ds.ROIContourSequence, ds.StructureSetROISequence) if r.ROIName == "PTV")
    template = item.ContourSequence[0]
    radius_mm, centre = 12.0, np.array([5.0, 0.0, 0.0])
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    contours, expected = [], np.zeros(GRID.shape_zyx, dtype=bool)
    c = GRID.voxel_centres_xyz()
    for k, z in enumerate(GRID.axis_mm("z")):
        if abs(z - centre[2]) >= radius_mm:
            continue
        r_k = np.sqrt(radius_mm**2 - (z - centre[2]) ** 2)
        xyz = np.column_stack([centre[0] + r_k * np.cos(theta), centre[1] + r_k * np.sin(theta), np.full(720, z)])
        contour = pydicom.Dataset()
        contour.ContourImageSequence = template.ContourImageSequence
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = 720
        contour.ContourData = [f"{v:.6f}" for v in xyz.ravel()]
        contours.append(contour)
        d = np.hypot(c[k, ..., 0] - centre[0], c[k, ..., 1] - centre[1])
        expected[k] = d < r_k
    item.ContourSequence = pydicom.Sequence(contours)
    ds.save_as(tmp_path / "RS_smooth.dcm", enforce_file_format=True)
    ptv = next(s for s in read_rtstruct(tmp_path / "RS_smooth.dcm", GRID) if s.name == "PTV")
    _assert_within_one_voxel(ptv.mask, expected)
    assert np.array_equal(ptv.mask, expected)  # no voxel centre lies within the chord error here


def test_read_dicom_builds_a_patient_without_identifiers(case):
    patient, folder, _, rs = case
    p = read_dicom(folder)
    assert p.name == "DICOM 20 slices"
    # (an identifier that no random UID can contain: UIDs are digits and dots)
    assert "Doe" not in repr(p.meta) and "PID-QXZ-4711" not in repr(p.meta)
    assert p.frame_of_reference_uid == patient.frame_of_reference_uid
    assert p.patient_position == "HFS"
    assert p.structure_names == patient.structure_names
    assert p.external.name == "BODY"
    assert p.meta["rtstruct_file"] == str(rs)
    assert p.targets[0].name == "PTV"


def test_read_dicom_without_rtstruct_falls_back_to_ct_threshold(case, tmp_path):
    patient, _, files, _ = case
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    p = read_dicom(tmp_path)
    assert p.structures == ()
    assert np.array_equal(p.body_mask(), patient.ct_hu > -500)


def test_read_dicom_picks_the_rtstruct_in_the_ct_frame(case, tmp_path):
    patient, folder, _, rs = case
    shutil.copytree(folder, tmp_path / "f")
    other = pydicom.dcmread(rs)
    other.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
    for roi in other.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = "1.2.3.4"
    other.StructureSetROISequence[0].ROIName = "OTHER"
    other.save_as(tmp_path / "f" / "RS_other.dcm", enforce_file_format=True)
    p = read_dicom(tmp_path / "f")
    assert p.meta["rtstruct_file"].endswith("RS.dcm")
    assert "OTHER" not in p.structure_names


# -------------------------------------------------------------------- RTDOSE
def test_rtdose_identity_on_the_ct_grid(case, tmp_path):
    patient, _, files, _ = case
    dose = np.random.default_rng(7).uniform(0.0, 70.0, GRID.shape_zyx).astype(np.float32)
    path = write_rtdose(dose, GRID, tmp_path / "RD.dcm", patient.frame_of_reference_uid, ct_files=files)
    got = read_rtdose(path, GRID, patient.frame_of_reference_uid)
    assert got.dtype == np.float32 and got.shape == GRID.shape_zyx
    np.testing.assert_allclose(got, dose, rtol=1e-6, atol=1e-6)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert float(ds.GridFrameOffsetVector[0]) == 0.0


def _linear_dose(points_xyz):
    return 30.0 + 0.2 * points_xyz[..., 0] - 0.1 * points_xyz[..., 1] + 0.3 * points_xyz[..., 2]


@pytest.mark.parametrize("offsets", ["relative", "absolute", "decreasing"])
def test_rtdose_trilinear_resampling_of_a_linear_dose(tmp_path, offsets):
    dose_grid = Grid((9, 13, 11), (4.0, 3.3, 2.7), (-17.3, -21.1, -20.2))
    dose = _linear_dose(dose_grid.voxel_centres_xyz())
    path = write_rtdose(dose, dose_grid, tmp_path / "RD.dcm", "1.2.3")
    if offsets != "relative":
        ds = pydicom.dcmread(path)
        z = np.asarray(dose_grid.axis_mm("z"))
        if offsets == "absolute":
            ds.GridFrameOffsetVector = [f"{v:.6f}" for v in z]
        else:  # frames stored top down, relative offsets negative
            stored = ds.pixel_array[::-1]
            ds.PixelData = np.ascontiguousarray(stored).tobytes()
            ds.ImagePositionPatient[2] = f"{z[-1]:.6f}"
            ds.GridFrameOffsetVector = [f"{v:.6f}" for v in (z[::-1] - z[-1])]
        ds.save_as(path, enforce_file_format=True)
    got = read_rtdose(path, GRID)
    (x0, x1), (y0, y1), (z0, z1) = dose_grid.extent_mm_xyz()
    c = GRID.voxel_centres_xyz()
    inside = ((c[..., 0] >= x0) & (c[..., 0] <= x1) & (c[..., 1] >= y0) & (c[..., 1] <= y1)
              & (c[..., 2] >= z0) & (c[..., 2] <= z1))
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(got[inside], _linear_dose(c)[inside], rtol=1e-5)
    assert np.all(got[~inside] == 0)
