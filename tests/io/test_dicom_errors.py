"""Bad DICOM input: every case is an InputError naming the file and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ids_engine.io._dicom import read_ct_series, read_dicom, read_rtdose, read_rtstruct, write_rtdose, write_rtstruct
from ids_engine.io._errors import InputError
from ids_engine.model import Grid, Patient
from tests.io.test_dicom import GRID, write_case


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine")
    patient, _, _ = write_case(folder)
    write_rtdose(np.ones(GRID.shape_zyx), GRID, folder / "RD.dcm", patient.frame_of_reference_uid)
    return patient, folder


@pytest.fixture
def case(pristine, tmp_path):
    """A fresh copy of a valid CT + RTSTRUCT + RTDOSE folder to break."""
    patient, folder = pristine
    target = tmp_path / "case"
    shutil.copytree(folder, target)
    return patient, target


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def _raises(call, *, file: str, field: str, words: str = "") -> InputError:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert file in message, message
    assert field in message, message
    assert words in message, message
    return info.value


def _ct_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("CT_*.dcm"))


# ----------------------------------------------------------------------- CT
def test_missing_slice(case):
    _, folder = case
    (folder / "CT_0010.dcm").unlink()
    err = _raises(lambda: read_ct_series(folder), file="CT_0011.dcm", field="ImagePositionPatient",
                  words="missing slice between z=")
    assert "CT_0009.dcm" in str(err)
    _raises(lambda: read_dicom(folder), file="CT_0009.dcm", field="ImagePositionPatient", words="missing slice")


def test_duplicate_slice(case):
    _, folder = case

    def new_uid(ds):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()

    shutil.copy(folder / "CT_0005.dcm", folder / "CT_0005b.dcm")
    _edit(folder / "CT_0005b.dcm", new_uid)
    err = _raises(lambda: read_ct_series(folder), file="CT_0005b.dcm", field="ImagePositionPatient",
                  words="duplicate slice position")
    assert "CT_0005.dcm" in str(err)


def test_uneven_slice_spacing(case):
    _, folder = case

    def shift(ds):
        ds.ImagePositionPatient[2] = str(float(ds.ImagePositionPatient[2]) + 1.0)

    _edit(folder / "CT_0007.dcm", shift)
    _raises(lambda: read_ct_series(folder), file="CT_0007.dcm", field="ImagePositionPatient", words="uneven")


def test_inconsistent_pixel_spacing(case):
    _, folder = case
    _edit(folder / "CT_0007.dcm", lambda ds: setattr(ds, "PixelSpacing", ["2.5", "2.5"]))
    _raises(lambda: read_ct_series(folder), file="CT_0007.dcm", field="PixelSpacing")


def test_inconsistent_rows(case):
    _, folder = case
    _edit(folder / "CT_0003.dcm", lambda ds: setattr(ds, "Rows", 39))
    _raises(lambda: read_ct_series(folder), file="CT_0003.dcm", field="Rows")


def test_oblique_orientation(case):
    _, folder = case
    c, s = np.cos(0.2), np.sin(0.2)
    _edit(folder / "CT_0004.dcm", lambda ds: setattr(ds, "ImageOrientationPatient",
                                                      [f"{v:.6f}" for v in (c, s, 0, -s, c, 0)]))
    _raises(lambda: read_ct_series(folder), file="CT_0004.dcm", field="ImageOrientationPatient", words="oblique")


def test_flipped_orientation_is_refused(case):
    _, folder = case
    for f in _ct_files(folder):
        _edit(f, lambda ds: setattr(ds, "ImageOrientationPatient", ["-1", "0", "0", "0", "-1", "0"]))
    _raises(lambda: read_ct_series(folder), file="CT_0000.dcm", field="ImageOrientationPatient",
            words="standard orientation")


def test_two_series(case):
    _, folder = case
    _edit(folder / "CT_0012.dcm", lambda ds: setattr(ds, "SeriesInstanceUID", pydicom.uid.generate_uid()))
    _raises(lambda: read_ct_series(folder), file="case", field="SeriesInstanceUID", words="2 CT series")
    # Picking one series then finds the gap the other one leaves.
    series = pydicom.dcmread(folder / "CT_0000.dcm").SeriesInstanceUID
    _raises(lambda: read_ct_series(folder, series_instance_uid=series), file="CT_0013.dcm",
            field="ImagePositionPatient", words="missing slice")


def test_two_frames_of_reference_in_one_series(case):
    _, folder = case
    _edit(folder / "CT_0002.dcm", lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4"))
    _raises(lambda: read_ct_series(folder), file="CT_0002.dcm", field="FrameOfReferenceUID")


def test_missing_required_tag(case):
    _, folder = case
    _edit(folder / "CT_0006.dcm", lambda ds: delattr(ds, "ImagePositionPatient"))
    _raises(lambda: read_ct_series(folder), file="CT_0006.dcm", field="ImagePositionPatient", words="missing")


def test_truncated_pixel_data(case):
    _, folder = case
    _edit(folder / "CT_0008.dcm", lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))
    _raises(lambda: read_ct_series(folder), file="CT_0008.dcm", field="PixelData")


def test_text_file_named_dcm(tmp_path):
    bogus = tmp_path / "slice.dcm"
    bogus.write_text("this is not DICOM\n" * 20)
    for reader in (lambda: read_ct_series([bogus]), lambda: read_rtstruct(bogus, GRID),
                   lambda: read_rtdose(bogus, GRID)):
        _raises(reader, file="slice.dcm", field="File Meta Information", words="not a DICOM file")


def test_missing_file(tmp_path):
    _raises(lambda: read_rtstruct(tmp_path / "nowhere.dcm", GRID), file="nowhere.dcm",
            field="File Meta Information", words="no such file")


def test_wrong_modality(case):
    _, folder = case
    _raises(lambda: read_ct_series([folder / "CT_0000.dcm", folder / "RD.dcm"]), file="RD.dcm",
            field="Modality", words="RTDOSE")
    _raises(lambda: read_rtstruct(folder / "CT_0000.dcm", GRID), file="CT_0000.dcm", field="Modality")
    _raises(lambda: read_rtdose(folder / "RS.dcm", GRID), file="RS.dcm", field="Modality")


def test_folder_without_ct(case, tmp_path):
    _, folder = case
    empty = tmp_path / "no_ct"
    empty.mkdir()
    shutil.copy(folder / "RS.dcm", empty / "RS.dcm")
    _raises(lambda: read_dicom(empty), file="no_ct", field="Modality", words="no CT")


# ------------------------------------------------------------------ RTSTRUCT
def _contour(ds, roi_name: str, index: int = 0):
    number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    item = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)
    return item, item.ContourSequence[index]


def test_rtstruct_in_another_frame_of_reference(case):
    patient, folder = case

    def move(ds):
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = "1.2.3.4"

    _edit(folder / "RS.dcm", move)
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID, patient.frame_of_reference_uid), file="RS.dcm",
            field="FrameOfReferenceUID")
    _raises(lambda: read_dicom(folder), file="RS.dcm", field="FrameOfReferenceUID")


def test_one_roi_in_another_frame_of_reference(case):
    patient, folder = case
    _edit(folder / "RS.dcm", lambda ds: setattr(ds.StructureSetROISequence[2], "ReferencedFrameOfReferenceUID",
                                                "1.2.3.4"))
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID, patient.frame_of_reference_uid), file="RS.dcm",
            field="ReferencedFrameOfReferenceUID", words="'Cord'")


def test_contour_point_outside_the_grid(case):
    _, folder = case

    def push(ds):
        _, contour = _contour(ds, "PTV", 1)
        data = [float(v) for v in contour.ContourData]
        data[0] = 400.0
        contour.ContourData = [f"{v:.4f}" for v in data]

    _edit(folder / "RS.dcm", push)
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID), file="RS.dcm", field="ContourData",
            words="ROI 'PTV' (ROI number 2), contour 2")


def test_contour_off_the_ct_slices(case):
    _, folder = case

    def lift(ds):
        _, contour = _contour(ds, "Cord", 0)
        data = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
        data[:, 2] = 300.0
        contour.ContourData = [f"{v:.4f}" for v in data.ravel()]

    _edit(folder / "RS.dcm", lift)
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID), file="RS.dcm", field="ContourData",
            words="not on a CT slice")


def test_non_planar_contour(case):
    _, folder = case

    def tilt(ds):
        _, contour = _contour(ds, "Cord", 0)
        data = [float(v) for v in contour.ContourData]
        data[2] += 1.0
        contour.ContourData = [f"{v:.4f}" for v in data]

    _edit(folder / "RS.dcm", tilt)
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID), file="RS.dcm", field="ContourData",
            words="not planar")


def test_empty_structure(case):
    _, folder = case

    def shrink(ds):
        item, contour = _contour(ds, "Diag", 0)
        x, y, z = GRID.index_to_world([10, 5.2, 25.2])
        contour.ContourData = [f"{v:.4f}" for v in (x, y, z, x + 0.5, y, z, x, y + 0.5, z)]
        contour.NumberOfContourPoints = 3
        item.ContourSequence = pydicom.Sequence([contour])

    _edit(folder / "RS.dcm", shrink)
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID), file="RS.dcm", field="ContourData",
            words="empty structure: ROI 'Diag'")


def test_duplicate_roi_names(case):
    _, folder = case
    _edit(folder / "RS.dcm", lambda ds: setattr(ds.StructureSetROISequence[3], "ROIName", "PTV"))
    _raises(lambda: read_rtstruct(folder / "RS.dcm", GRID), file="RS.dcm", field="ROIName", words="'PTV'")


def test_several_rtstructs_none_in_the_frame(case):
    _, folder = case

    def move(ds):
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
        for roi in ds.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = "1.2.3.4"

    _edit(folder / "RS.dcm", move)
    shutil.copy(folder / "RS.dcm", folder / "RS2.dcm")
    _raises(lambda: read_dicom(folder), file="case", field="FrameOfReferenceUID", words="RS2.dcm")


# -------------------------------------------------------------------- RTDOSE
def test_rtdose_units_and_frame(case):
    patient, folder = case
    _raises(lambda: read_rtdose(folder / "RD.dcm", GRID, "1.2.3.4"), file="RD.dcm", field="FrameOfReferenceUID")
    _edit(folder / "RD.dcm", lambda ds: setattr(ds, "DoseUnits", "RELATIVE"))
    _raises(lambda: read_rtdose(folder / "RD.dcm", GRID), file="RD.dcm", field="DoseUnits")


def test_rtdose_bad_frame_offsets(case):
    _, folder = case
    _edit(folder / "RD.dcm", lambda ds: setattr(ds, "GridFrameOffsetVector", ds.GridFrameOffsetVector[:-1]))
    _raises(lambda: read_rtdose(folder / "RD.dcm", GRID), file="RD.dcm", field="GridFrameOffsetVector")
    _edit(folder / "RD.dcm", lambda ds: delattr(ds, "DoseGridScaling"))
    _raises(lambda: read_rtdose(folder / "RD.dcm", GRID), file="RD.dcm", field="DoseGridScaling")


# ------------------------------------------------------------------- writers
def test_write_rtstruct_needs_the_patients_ct(case, tmp_path):
    patient, folder = case
    files = _ct_files(folder)
    _raises(lambda: write_rtstruct(patient, tmp_path / "RS.dcm", files[:-1]), file="case",
            field="ImagePositionPatient", words="no CT file for grid slices")
    shifted = Patient(Grid(GRID.shape_zyx, GRID.spacing_mm_zyx, (-38.0, -39.0, -28.5)), patient.ct_hu)
    _raises(lambda: write_rtstruct(shifted, tmp_path / "RS.dcm", files), file="CT_0000.dcm",
            field="ImagePositionPatient", words="grid origin")
    other = Patient(GRID, patient.ct_hu, frame_of_reference_uid="1.2.3.4")
    _raises(lambda: write_rtstruct(other, tmp_path / "RS.dcm", files), file="CT_0000.dcm",
            field="FrameOfReferenceUID")
    assert not (tmp_path / "RS.dcm").exists()


# ---------------------------------------------------------------- truncation
def _element_ends(path: Path) -> list[int]:
    """File offsets where the top-level elements of a DICOM file end (cuts there leave whole elements)."""
    ds = pydicom.dcmread(path)
    ends = []
    for tag in ds.keys():
        el = ds.get_item(tag)
        if isinstance(getattr(el, "value_tell", None), int):
            ends.append(el.value_tell + el.length)
    return ends


def _cut_points(path: Path, n: int = 10) -> list[int]:
    """``n`` cuts spread over the file, a few in the preamble, and every top-level element boundary."""
    size = path.stat().st_size
    cuts = {0, 60, 130, *np.linspace(0, size, n + 2, dtype=int)[1:-1].tolist(), *_element_ends(path)}
    return sorted(c for c in cuts if c < size)


def test_truncated_rtstruct_is_refused_never_fewer_structures(case):
    """A structure set cut anywhere is an error naming it, never a patient with fewer structures or changed kinds."""
    _, folder = case
    want = read_dicom(folder)
    rs = folder / "RS.dcm"
    data = rs.read_bytes()
    cuts = _cut_points(rs)
    assert len(cuts) > 30
    refused = 0
    for cut in cuts:
        rs.write_bytes(data[:cut])
        try:
            got = read_dicom(folder)
        except InputError as err:
            assert "RS.dcm" in str(err), (cut, str(err))
            refused += 1
            continue
        assert [(s.name, s.kind) for s in got.structures] == [(s.name, s.kind) for s in want.structures], cut
        for a, b in zip(got.structures, want.structures):
            np.testing.assert_array_equal(a.mask, b.mask)
    assert refused == len(cuts)  # none of these cuts leaves a whole structure set


def test_structure_set_cut_after_the_roi_list_names_the_missing_part(case):
    patient, folder = case
    rs = folder / "RS.dcm"
    _edit(rs, lambda ds: delattr(ds, "RTROIObservationsSequence"))
    _raises(lambda: read_dicom(folder), file="RS.dcm", field="RTROIObservationsSequence", words="missing")
    _edit(rs, lambda ds: delattr(ds, "ROIContourSequence"))
    _raises(lambda: read_dicom(folder), file="RS.dcm", field="ROIContourSequence", words="missing")


def test_roi_without_contour_item_or_observation(case):
    patient, folder = case
    rs = folder / "RS.dcm"
    original = rs.read_bytes()

    def drop_last(keyword):
        def change(ds):
            setattr(ds, keyword, pydicom.Sequence(list(ds[keyword].value)[:-1]))
        return change

    _edit(rs, drop_last("RTROIObservationsSequence"))
    _raises(lambda: read_rtstruct(rs, GRID), file="RS.dcm", field="RTROIObservationsSequence",
            words="no item for 1 of 5 ROIs: 'Diag' (ROI number 5)")
    rs.write_bytes(original)
    _edit(rs, drop_last("ROIContourSequence"))
    _raises(lambda: read_rtstruct(rs, GRID), file="RS.dcm", field="ROIContourSequence",
            words="no item for 1 of 5 ROIs: 'Diag' (ROI number 5)")


@pytest.mark.parametrize("name", ["CT_0019.dcm", "CT_0010.dcm"])
def test_truncated_ct_slice_is_named(case, name):
    """A CT slice cut anywhere (the last one too) is an error naming it, never a shorter grid or a "missing slice"."""
    _, folder = case
    path = folder / name
    data = path.read_bytes()
    cuts = _cut_points(path, n=8)
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(InputError) as info:
            read_ct_series(folder)
        assert name in str(info.value), (cut, str(info.value))
        assert "missing slice" not in str(info.value), (cut, str(info.value))


def test_truncated_pixel_data_says_how_many_bytes(case):
    _, folder = case
    path = folder / "CT_0019.dcm"
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    _raises(lambda: read_ct_series(folder), file="CT_0019.dcm", field="PixelData",
            words="2200 of the 3200 bytes of its last element are present")
    path.write_bytes(data)
    _edit(path, lambda ds: setattr(ds, "PixelData", ds.PixelData[:-2]))
    _raises(lambda: read_ct_series(folder), file="CT_0019.dcm", field="PixelData",
            words="pixel data has 3198 bytes, expected 3200")


# ------------------------------------------------------------------- rescale
@pytest.mark.parametrize(("slope", "shown"), [("0", "got 0"), ("-1", "got -1")])
def test_rescale_slope_must_be_positive(case, slope, shown):
    _, folder = case
    _edit(folder / "CT_0005.dcm", lambda ds: setattr(ds, "RescaleSlope", slope))
    _raises(lambda: read_ct_series(folder), file="CT_0005.dcm", field="RescaleSlope", words=shown)


def test_rescale_tag_missing_in_some_slices(case):
    _, folder = case
    _edit(folder / "CT_0007.dcm", lambda ds: delattr(ds, "RescaleIntercept"))
    _raises(lambda: read_dicom(folder), file="CT_0007.dcm", field="RescaleIntercept",
            words="missing in 1 of 20 slices (CT_0007.dcm)")
    for f in _ct_files(folder):
        _edit(f, lambda ds: delattr(ds, "RescaleIntercept") if "RescaleIntercept" in ds else None)
    _raises(lambda: read_ct_series(folder), file="CT_0000.dcm", field="RescaleIntercept",
            words="missing in all 20 slices, which have RescaleSlope")


def test_series_without_rescale_tags_is_read_as_hu_with_a_warning(case):
    patient, folder = case
    for f in _ct_files(folder):
        def drop(ds):
            ds.PixelData = (np.frombuffer(ds.PixelData, "<i2") - 1024).astype("<i2").tobytes()  # stored = HU
            del ds.RescaleSlope, ds.RescaleIntercept
        _edit(f, drop)
    got = read_dicom(folder)
    np.testing.assert_allclose(got.ct_hu, np.rint(patient.ct_hu), atol=0.5)
    assert got.meta["warnings"] == ["no RescaleSlope or RescaleIntercept in any of the 20 CT slices: stored "
                                    "pixel values taken as HU (slope 1, intercept 0), from -1000 to 950 HU"]


def test_rescale_to_non_finite_hu(case):
    _, folder = case
    _edit(folder / "CT_0003.dcm", lambda ds: setattr(ds, "RescaleSlope", "1e38"))
    _raises(lambda: read_ct_series(folder), file="CT_0003.dcm", field="RescaleSlope",
            words="1600 of 1600 voxels are not finite in float32 HU")


def test_truncated_encapsulated_pixel_data(case):
    """Undefined-length pixel data (RLE) cut short: pydicom reads on, the reader names the file."""
    _, folder = case
    path = folder / "CT_0019.dcm"
    _edit(path, lambda ds: ds.compress(pydicom.uid.RLELossless))
    read_ct_series(folder)  # the compressed slice itself reads
    data = path.read_bytes()
    for cut in (4, 8, 100):
        path.write_bytes(data[:-cut])
        _raises(lambda: read_ct_series(folder), file="CT_0019.dcm", field="", words="")
