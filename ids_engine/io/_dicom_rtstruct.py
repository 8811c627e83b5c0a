"""RT Structure Sets: closed planar contours <-> structure masks on the CT grid."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTStructureSetStorage, generate_uid

from ..model import Grid, Patient, Structure, StructureKind, default_colour
from ._dicom_common import (
    check_modality,
    copy_patient_and_study,
    ds_number,
    get_floats,
    get_int,
    get_sequence,
    get_str,
    new_dataset,
    read_dataset,
    save_atomic,
)
from ._dicom_contours import fill_polygons, trace_outlines
from ._dicom_ct import ct_slice_headers, match_slices
from ._errors import InputError

__all__ = ["read_rtstruct", "rtstruct_frames", "structures_from_dataset", "write_rtstruct"]

# DICOM RTROIInterpretedType -> our kind; anything else is an organ at risk.
_KIND_OF_TYPE = {"PTV": StructureKind.TARGET, "CTV": StructureKind.TARGET, "GTV": StructureKind.TARGET,
                 "EXTERNAL": StructureKind.EXTERNAL}

# Contour vertices may sit this far (in voxels) beyond the outer voxel faces: a contour
# along the grid border lies exactly on them, up to rounding in the DS strings.
_BORDER_TOL_VOXELS = 1e-3

# Study Component Management SOP Class, referenced by RTReferencedStudySequence.
_STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


def read_rtstruct(path: "str | Path", grid: Grid, frame_of_reference_uid: str | None = None) -> list[Structure]:
    """Read an RT Structure Set and rasterise its ROIs onto the CT grid.

    Closed planar contours are filled with the even-odd rule, evaluated exactly at voxel
    centres: a voxel belongs to a structure when its centre lies inside, so holes (a
    contour inside another) and several islands per slice work. A contour is put on the
    CT slice nearest its z, which must lie within half a slice spacing.

    ROIs without any CLOSED_PLANAR contour (points of interest, ROIs never drawn) carry
    no volume and are skipped.

    Parameters
    ----------
    path : the RTSTRUCT file.
    grid : the CT grid (from :func:`read_ct_series`).
    frame_of_reference_uid : the CT's FrameOfReferenceUID; when given, the structure set
        and every ROI used must be in this frame of reference.

    Returns
    -------
    list of Structure
        In StructureSetROISequence order. ``kind`` from RTROIInterpretedType (PTV, CTV,
        GTV: target; EXTERNAL: external; anything else: OAR), ``colour`` from
        ROIDisplayColor (the default palette when absent), ``meta`` with ``roi_number``
        and ``interpreted_type``.

    Raises
    ------
    InputError
        Naming the file and the field: not DICOM, not RTSTRUCT, another frame of
        reference, a contour off the CT slices or outside the grid, a non-planar contour,
        two contours of one ROI at different z on the same slice, an ROI whose contours
        enclose no voxel centre ("empty structure"), duplicate ROI names, missing tags;
        an incomplete or truncated structure set: no ROIContourSequence or
        RTROIObservationsSequence, an ROI without an ROIContourSequence item, an ROI
        with contours but without an RTROIObservationsSequence item (its kind would be
        unknown), a file cut short (see :func:`~._dicom_common.read_dataset`).
    """
    ds = read_dataset(path)
    return structures_from_dataset(ds, Path(path), grid, frame_of_reference_uid)


def rtstruct_frames(ds: Dataset, path: Path) -> set[str]:
    """Every FrameOfReferenceUID an RTSTRUCT names (structure set and ROIs)."""
    frames = {get_str(item, "FrameOfReferenceUID", path)
              for item in get_sequence(ds, "ReferencedFrameOfReferenceSequence", path, required=False)}
    for roi in get_sequence(ds, "StructureSetROISequence", path, required=False):
        frames.add(get_str(roi, "ReferencedFrameOfReferenceUID", path))
    return frames


def _kind(interpreted_type: str) -> StructureKind:
    return _KIND_OF_TYPE.get(interpreted_type.upper(), StructureKind.OAR)


def structures_from_dataset(
    ds: Dataset, path: Path, grid: Grid, frame_of_reference_uid: str | None = None
) -> list[Structure]:
    """The work of :func:`read_rtstruct` on a data set already read."""
    check_modality(ds, path, "RTSTRUCT")
    if frame_of_reference_uid:
        referenced = [get_str(item, "FrameOfReferenceUID", path)
                      for item in get_sequence(ds, "ReferencedFrameOfReferenceSequence", path, required=False)]
        if referenced and frame_of_reference_uid not in referenced:
            raise InputError(f"the structure set references {', '.join(referenced)}, not the CT's "
                             f"{frame_of_reference_uid}", path, "ReferencedFrameOfReferenceSequence.FrameOfReferenceUID")

    # ROIs by number, in file order.
    rois: dict[int, dict] = {}
    for item in get_sequence(ds, "StructureSetROISequence", path):
        number = get_int(item, "ROINumber", path)
        name = get_str(item, "ROIName", path, default="") or f"ROI {number}"
        if number in rois:
            raise InputError(f"ROI number {number} appears twice", path, "ROINumber")
        if any(r["name"] == name for r in rois.values()):
            raise InputError(f"two ROIs are called {name!r}", path, "ROIName")
        rois[number] = {"name": name, "frame": get_str(item, "ReferencedFrameOfReferenceUID", path),
                        "type": "", "colour": None, "contours": []}
    # Both sequences are required (type 1): a structure set cut short after its ROI list
    # would otherwise give a patient with fewer structures, or with targets taken as OARs.
    contoured = set()
    for item in get_sequence(ds, "ROIContourSequence", path):
        number = get_int(item, "ReferencedROINumber", path)
        if number not in rois:
            raise InputError(f"ROIContourSequence refers to ROI number {number}, which StructureSetROISequence "
                             "does not define", path, "ReferencedROINumber")
        contoured.add(number)
        roi = rois[number]
        if "ROIDisplayColor" in item:
            rgb = get_floats(item, "ROIDisplayColor", path, count=3)
            roi["colour"] = tuple(float(c) for c in np.clip(rgb / 255.0, 0.0, 1.0))
        for contour in get_sequence(item, "ContourSequence", path, required=False):
            if get_str(contour, "ContourGeometricType", path).upper() == "CLOSED_PLANAR":
                roi["contours"].append(get_floats(contour, "ContourData", path))
    observed = set()
    for item in get_sequence(ds, "RTROIObservationsSequence", path):
        number = get_int(item, "ReferencedROINumber", path)
        observed.add(number)
        if number in rois:
            rois[number]["type"] = get_str(item, "RTROIInterpretedType", path, default="")

    _check_every_roi_listed(rois, contoured, path, "ROIContourSequence")
    _check_every_roi_listed({k: r for k, r in rois.items() if r["contours"]}, observed, path,
                            "RTROIObservationsSequence")

    structures = []
    for n, (number, roi) in enumerate(rois.items()):
        if not roi["contours"]:
            continue
        label = f"ROI {roi['name']!r} (ROI number {number})"
        if frame_of_reference_uid and roi["frame"] != frame_of_reference_uid:
            raise InputError(f"{label} is in frame of reference {roi['frame']}, the CT in {frame_of_reference_uid}",
                             path, "ReferencedFrameOfReferenceUID")
        polygons = [_polygon_on_grid(data, grid, path, label, c) for c, data in enumerate(roi["contours"])]
        _check_one_plane_per_slice(polygons, path, label)
        mask = fill_polygons([(k, r, c) for k, r, c, _ in polygons], grid.shape_zyx)
        if not mask.any():
            raise InputError(f"empty structure: {label} has {len(polygons)} contour(s) but they enclose no voxel "
                             f"centre of the CT grid", path, "ContourData")
        structures.append(Structure(roi["name"], _kind(roi["type"]), mask, grid, roi["colour"] or default_colour(n),
                                    meta={"roi_number": number, "interpreted_type": roi["type"]}))
    return structures


def _check_every_roi_listed(rois: dict[int, dict], listed: set[int], path: Path, keyword: str) -> None:
    """Every ROI of ``rois`` needs an item in the sequence ``keyword`` (the structure set is incomplete or cut short)."""
    missing = [f"{r['name']!r} (ROI number {number})" for number, r in rois.items() if number not in listed]
    if missing:
        raise InputError(f"no item for {len(missing)} of {len(rois)} ROIs: {', '.join(missing)}; the structure set "
                         "is incomplete or truncated", path, keyword)


def _polygon_on_grid(data: np.ndarray, grid: Grid, path: Path, label: str, c: int):
    """(slice index, fractional rows, fractional columns, z mm) of one closed planar contour."""
    where = f"{label}, contour {c + 1}"
    if data.size < 9 or data.size % 3:
        raise InputError(f"{where}: needs at least 3 points of (x, y, z), got {data.size} numbers", path,
                         "ContourData")
    xyz = data.reshape(-1, 3)
    dz = grid.spacing_mm_zyx[0]
    z = xyz[:, 2]
    if z.max() - z.min() > max(0.01, 0.01 * dz):
        raise InputError(f"{where}: not planar (z from {z.min():g} to {z.max():g} mm)", path, "ContourData")
    z_mm = float(z.mean())
    k_frac = (z_mm - grid.origin_mm_xyz[2]) / dz
    k = int(np.rint(k_frac))
    if not 0 <= k < grid.shape_zyx[0] or abs(k_frac - k) > 0.5 + 1e-6:
        z_ct = grid.axis_mm("z")
        raise InputError(f"{where}: z={z_mm:g} mm is not on a CT slice (slices from z={z_ct[0]:g} to "
                         f"{z_ct[-1]:g} mm, spacing {dz:g} mm)", path, "ContourData")
    idx = grid.world_to_index(xyz)
    rows, cols = idx[:, 1], idx[:, 2]
    _, ny, nx = grid.shape_zyx
    lo, hi = -0.5 - _BORDER_TOL_VOXELS, np.array([ny, nx]) - 0.5 + _BORDER_TOL_VOXELS
    outside = (rows < lo) | (rows > hi[0]) | (cols < lo) | (cols > hi[1])
    if np.any(outside):
        x, y, _ = xyz[np.argmax(outside)]
        (x0, x1), (y0, y1), _ = grid.extent_mm_xyz()
        dy, dx = grid.spacing_mm_zyx[1:]
        raise InputError(f"{where}: point (x={x:g}, y={y:g}) mm on z={z_mm:g} mm lies outside the CT grid "
                         f"(x {x0 - dx / 2:g}..{x1 + dx / 2:g} mm, y {y0 - dy / 2:g}..{y1 + dy / 2:g} mm)",
                         path, "ContourData")
    return k, rows, cols, z_mm


def _check_one_plane_per_slice(polygons, path: Path, label: str) -> None:
    """Contours at different z that land on one slice would cancel in the even-odd fill."""
    seen: dict[int, float] = {}
    for k, _, _, z_mm in polygons:
        if k in seen and abs(seen[k] - z_mm) > 0.01:
            raise InputError(f"{label}: contours at z={seen[k]:g} and z={z_mm:g} mm both fall on CT slice {k}; "
                             "the structure set was drawn on another slice spacing", path, "ContourData")
        seen.setdefault(k, z_mm)


# ------------------------------------------------------------------ writing
def _interpreted_type(structure: Structure) -> str:
    """RTROIInterpretedType for a structure (the one it was read with, when it still fits)."""
    kept = str(structure.meta.get("interpreted_type", "")).upper() if structure.meta else ""
    if kept and _kind(kept) is structure.kind:
        return kept
    if structure.kind is StructureKind.EXTERNAL:
        return "EXTERNAL"
    if structure.kind is StructureKind.TARGET:
        head = structure.name.strip().upper()[:3]
        return head if head in ("CTV", "GTV") else "PTV"
    return "ORGAN"


def write_rtstruct(
    patient: Patient, path: "str | Path", ct_files: Sequence["str | Path"], *, label: str = "IDS"
) -> Path:
    """Write the patient's structures as an RT Structure Set referencing a CT series.

    Each slice of each mask becomes closed planar polygons along voxel edges (outer
    boundaries and holes alike, one contour per loop), so reading the file back on the
    same grid gives the masks exactly. Empty structures are written as ROIs without
    contours. The file is written atomically.

    Parameters
    ----------
    patient : the patient; its grid must be the CT's.
    path : the RTSTRUCT file to write.
    ct_files : the CT slices the contours refer to (e.g. from :func:`write_dicom_ct` or
        ``meta["files"]`` of :func:`read_ct_series`); their study, series, frame of
        reference and patient module are referenced or copied.
    label : StructureSetLabel.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        A CT file is missing for a grid slice, or the CT's frame of reference is not the
        patient's.
    """
    headers = match_slices(ct_slice_headers(ct_files), patient.grid)
    p0, ct0 = headers[0]
    frame = get_str(ct0, "FrameOfReferenceUID", p0)
    if patient.frame_of_reference_uid and patient.frame_of_reference_uid != frame:
        raise InputError(f"the CT is in frame of reference {frame}, the patient in "
                         f"{patient.frame_of_reference_uid}", p0, "FrameOfReferenceUID")
    series = get_str(ct0, "SeriesInstanceUID", p0)
    for p, ds in headers:
        if get_str(ds, "SeriesInstanceUID", p) != series or get_str(ds, "FrameOfReferenceUID", p) != frame:
            raise InputError(f"not in the series / frame of reference of {p0.name}", p, "SeriesInstanceUID")

    ds = new_dataset(RTStructureSetStorage, "RTSTRUCT")
    copy_patient_and_study(ds, ct0)
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 2
    ds.SeriesDescription = "ids-engine structures"
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    now = datetime.datetime.now()
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")

    def image_ref(k: int) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = headers[k][1].SOPClassUID
        ref.ReferencedSOPInstanceUID = headers[k][1].SOPInstanceUID
        return ref

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = series
    series_ref.ContourImageSequence = DicomSequence([image_ref(k) for k in range(len(headers))])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    grid = patient.grid
    z_mm = grid.axis_mm("z")
    roi_items, contour_items, observation_items = [], [], []
    for number, s in enumerate(patient.structures, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = s.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_items.append(roi)

        contours = []
        for k in np.nonzero(s.mask.any(axis=(1, 2)))[0]:
            for loop in trace_outlines(s.mask[k]):
                xyz = grid.index_to_world(np.column_stack([np.full(len(loop), float(k)), loop]))
                xyz[:, 2] = z_mm[k]
                c = Dataset()
                c.ContourImageSequence = DicomSequence([image_ref(int(k))])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(loop)
                c.ContourData = [ds_number(v) for v in xyz.ravel()]
                contours.append(c)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [int(round(255 * v)) for v in s.colour]
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _interpreted_type(s)
        obs.ROIInterpreter = ""
        observation_items.append(obs)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    return save_atomic(ds, path)
