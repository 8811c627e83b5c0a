"""CT image series: read a folder or list of slices onto a :class:`Grid`; write one back."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from ..model import PATIENT_POSITIONS, Grid, Patient
from ._dicom_common import (
    check_modality,
    check_standard_orientation,
    ds_number,
    ds_numbers,
    get_float,
    get_floats,
    get_int,
    get_str,
    modality_of,
    names,
    new_dataset,
    read_dataset,
    save_atomic,
    scan_folder,
    set_patient_and_study,
)
from ._errors import InputError

__all__ = ["ct_from_datasets", "ct_slice_headers", "match_slices", "read_ct_series", "write_dicom_ct"]

# Slice positions closer than this (mm) are the same position.
_POSITION_TOL_MM = 1e-3


def _relative_tol_mm(spacing_mm: float) -> float:
    """Tolerance for comparing slice gaps: 1 % of the spacing, at least 0.01 mm."""
    return max(0.01, 0.01 * spacing_mm)


def read_ct_series(
    folder_or_paths: "str | Path | Sequence[str | Path]", *, series_instance_uid: str | None = None
) -> tuple[Grid, np.ndarray, dict]:
    """Read a CT image series onto an axis-aligned grid.

    Parameters
    ----------
    folder_or_paths : a folder (every CT slice directly inside it is read; files that
        are not DICOM and other modalities such as RTSTRUCT or RTDOSE are skipped), a
        single file, or a list of files (each must be a DICOM CT slice).
    series_instance_uid : pick this series when the folder holds several.

    Returns
    -------
    grid : Grid
        ``spacing_mm_zyx = (slice spacing, PixelSpacing[0] (rows, y), PixelSpacing[1]
        (columns, x))``; ``origin_mm_xyz`` is the ImagePositionPatient of the most
        inferior slice.
    ct_hu : numpy.ndarray
        float32, shape ``grid.shape_zyx`` (z, y, x), Hounsfield units (RescaleSlope and
        RescaleIntercept applied).
    meta : dict
        ``frame_of_reference_uid``, ``patient_position`` (PatientPosition, HFS when
        absent), ``series_instance_uid``, ``study_instance_uid``, ``files`` (paths in
        slice order, as str), ``sop_instance_uids`` (in slice order) and ``warnings``
        (list of str: a series without RescaleSlope and RescaleIntercept in every slice
        is read with slope 1 and intercept 0, and says so here).

    Raises
    ------
    InputError
        Naming the file and the field: not DICOM, not CT, several series or frames of
        reference, an orientation other than ``[1, 0, 0, 0, 1, 0]``, inconsistent Rows,
        Columns or PixelSpacing, duplicate or missing slices, uneven slice spacing,
        missing required tags, pixel data that cannot be decoded or of the wrong length,
        RescaleSlope <= 0, RescaleSlope or RescaleIntercept in some slices but not all,
        HU that are not finite in float32.
    """
    if isinstance(folder_or_paths, (str, Path)) and Path(folder_or_paths).is_dir():
        folder = Path(folder_or_paths)
        items = [(p, ds) for p, ds in scan_folder(folder) if modality_of(ds) == "CT"]
        if not items:
            raise InputError("no CT image files in the folder", folder, "Modality")
        return ct_from_datasets(items, where=folder, series_instance_uid=series_instance_uid)
    paths = [folder_or_paths] if isinstance(folder_or_paths, (str, Path)) else list(folder_or_paths)
    if not paths:
        raise InputError("no CT files given", None, "Modality")
    items = []
    for p in paths:
        ds = read_dataset(p)
        check_modality(ds, p, "CT")
        items.append((Path(p), ds))
    return ct_from_datasets(items, where=Path(paths[0]).parent, series_instance_uid=series_instance_uid)


def ct_from_datasets(
    items: list[tuple[Path, Dataset]], *, where: Path, series_instance_uid: str | None = None
) -> tuple[Grid, np.ndarray, dict]:
    """The work of :func:`read_ct_series` on data sets already read (all of modality CT)."""
    # One series.
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for p, ds in items:
        by_series.setdefault(get_str(ds, "SeriesInstanceUID", p), []).append((p, ds))
    if series_instance_uid is not None:
        if series_instance_uid not in by_series:
            raise InputError(f"no CT series {series_instance_uid!r}; found {sorted(by_series)}", where,
                             "SeriesInstanceUID")
        items = by_series[series_instance_uid]
    elif len(by_series) > 1:
        counts = ", ".join(f"{uid} ({len(v)} files, e.g. {v[0][0].name})" for uid, v in by_series.items())
        raise InputError(f"{len(by_series)} CT series found: {counts}; keep one series per folder (from Python, "
                         "read_dicom(..., series_instance_uid=...) picks one)", where, "SeriesInstanceUID")

    # One frame of reference, one patient position.
    first_path, first = items[0]
    frame = get_str(first, "FrameOfReferenceUID", first_path)
    position = get_str(first, "PatientPosition", first_path, default="HFS").upper()
    if position not in PATIENT_POSITIONS:
        raise InputError(f"{position!r} is not supported; expected one of {PATIENT_POSITIONS}", first_path,
                         "PatientPosition")
    rows = get_int(first, "Rows", first_path)
    cols = get_int(first, "Columns", first_path)
    pixel_spacing = get_floats(first, "PixelSpacing", first_path, count=2)
    if np.any(pixel_spacing <= 0):
        raise InputError(f"must be positive, got {pixel_spacing.tolist()}", first_path, "PixelSpacing")

    positions = np.empty((len(items), 3))
    for n, (p, ds) in enumerate(items):
        if get_str(ds, "FrameOfReferenceUID", p) != frame:
            raise InputError(f"{ds.FrameOfReferenceUID} differs from {frame} in {first_path.name}", p,
                             "FrameOfReferenceUID")
        if get_str(ds, "PatientPosition", p, default="HFS").upper() != position:
            raise InputError(f"differs from {position} in {first_path.name}", p, "PatientPosition")
        if get_int(ds, "NumberOfFrames", p, default=1) != 1:
            raise InputError("multi-frame (enhanced) CT is not supported; export single-frame slices", p,
                             "NumberOfFrames")
        check_standard_orientation(ds, p)
        if get_int(ds, "Rows", p) != rows:
            raise InputError(f"{ds.Rows} differs from {rows} in {first_path.name}", p, "Rows")
        if get_int(ds, "Columns", p) != cols:
            raise InputError(f"{ds.Columns} differs from {cols} in {first_path.name}", p, "Columns")
        ps = get_floats(ds, "PixelSpacing", p, count=2)
        if not np.allclose(ps, pixel_spacing, rtol=0, atol=_POSITION_TOL_MM):
            raise InputError(f"{ps.tolist()} differs from {pixel_spacing.tolist()} in {first_path.name}", p,
                             "PixelSpacing")
        positions[n] = get_floats(ds, "ImagePositionPatient", p, count=3)

    # Slices along the normal (+z for the standard orientation).
    order = np.argsort(positions[:, 2], kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    paths = [p for p, _ in items]
    off_axis = np.abs(positions[:, :2] - positions[0, :2]).max(axis=1)
    if np.any(off_axis > 0.01):
        n = int(np.argmax(off_axis))
        raise InputError(f"x, y {positions[n, :2].tolist()} differ from {positions[0, :2].tolist()} in "
                         f"{paths[0].name}: the slices are not stacked along z", paths[n], "ImagePositionPatient")
    z = positions[:, 2]
    gaps = np.diff(z)
    if np.any(gaps < _POSITION_TOL_MM):
        n = int(np.nonzero(gaps < _POSITION_TOL_MM)[0][0])
        raise InputError(f"duplicate slice position z={z[n]:g} mm in {paths[n].name} and {paths[n + 1].name}",
                         paths[n + 1], "ImagePositionPatient")
    if len(items) > 1:
        spacing = float(np.median(gaps))
        tol = _relative_tol_mm(spacing)
        uneven = np.nonzero(np.abs(gaps - spacing) > tol)[0]
        if uneven.size:
            n = int(uneven[0])
            ratio = gaps[n] / spacing
            if round(ratio) >= 2 and abs(gaps[n] - round(ratio) * spacing) <= tol:
                what = f"missing slice between z={z[n]:g} and z={z[n + 1]:g} mm"
                if round(ratio) > 2:
                    what = f"{round(ratio) - 1} missing slices between z={z[n]:g} and z={z[n + 1]:g} mm"
                raise InputError(f"{what} ({paths[n].name} and {paths[n + 1].name}; spacing {spacing:g} mm)",
                                 paths[n + 1], "ImagePositionPatient")
            raise InputError(f"uneven slice spacing: {gaps[n]:g} mm between z={z[n]:g} ({paths[n].name}) and "
                             f"z={z[n + 1]:g} mm ({paths[n + 1].name}), elsewhere {spacing:g} mm",
                             paths[n + 1], "ImagePositionPatient")
        spacing = float((z[-1] - z[0]) / (len(z) - 1))
    else:
        spacing = get_float(first, "SliceThickness", first_path)
        if spacing <= 0:
            raise InputError("a single slice needs a positive SliceThickness", first_path, "SliceThickness")

    warnings = []
    rescaled = _series_is_rescaled(items)
    ct_hu = np.empty((len(items), rows, cols), dtype=np.float32)
    for k, (p, ds) in enumerate(items):
        ct_hu[k] = _slice_hu(ds, p, rows, cols, rescaled=rescaled)
    if not rescaled:
        warnings.append(f"no RescaleSlope or RescaleIntercept in any of the {len(items)} CT slices: stored pixel "
                        f"values taken as HU (slope 1, intercept 0), from {ct_hu.min():g} to {ct_hu.max():g} HU")

    grid = Grid((len(items), rows, cols), (spacing, pixel_spacing[0], pixel_spacing[1]), tuple(positions[0]))
    meta = {
        "frame_of_reference_uid": frame,
        "patient_position": position,
        "series_instance_uid": get_str(first, "SeriesInstanceUID", first_path),
        "study_instance_uid": get_str(first, "StudyInstanceUID", first_path, default=""),
        "files": [str(p) for p in paths],
        "sop_instance_uids": [get_str(ds, "SOPInstanceUID", p) for p, ds in items],
        "warnings": warnings,
    }
    return grid, ct_hu, meta


_RESCALE_TAGS = ("RescaleSlope", "RescaleIntercept")


def _series_is_rescaled(items: list[tuple[Path, Dataset]]) -> bool:
    """True when every slice has RescaleSlope and RescaleIntercept, False when none has either.

    Anything in between is an error naming a slice without the tag: a slice left at
    the default (intercept 0) would sit some 1024 HU above its neighbours.
    """
    has = {kw: [get_str(ds, kw, p, default="") != "" for p, ds in items] for kw in _RESCALE_TAGS}
    if not any(has["RescaleSlope"]) and not any(has["RescaleIntercept"]):
        return False
    for kw in _RESCALE_TAGS:
        lacking = [p for (p, _), ok in zip(items, has[kw]) if not ok]
        if lacking:
            other = next(o for o in _RESCALE_TAGS if o != kw)
            more = ", ..." if len(lacking) > 3 else ""
            where = (f"in {len(lacking)} of {len(items)} slices ({names(lacking[:3])}{more})"
                     if len(lacking) < len(items) else f"in all {len(items)} slices, which have {other}")
            raise InputError(f"required tag is missing {where}; the slices cannot be converted to HU", lacking[0], kw)
    return True


def _slice_hu(ds: Dataset, path: Path, rows: int, cols: int, *, rescaled: bool) -> np.ndarray:
    """One slice in HU, float32 (rows, cols); ``rescaled=False``: stored values are HU."""
    if "PixelData" not in ds:
        raise InputError("required tag is missing", path, "PixelData")
    samples = get_int(ds, "SamplesPerPixel", path, default=1)
    if samples != 1:
        raise InputError("CT must be greyscale (one sample per pixel)", path, "SamplesPerPixel")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        # Native pixel data: the length is known (pydicom would pad or mis-shape a short one).
        bits = get_int(ds, "BitsAllocated", path)
        expected = rows * cols * samples * bits // 8
        have = len(ds.PixelData)
        if have not in (expected, expected + expected % 2):
            raise InputError(f"pixel data has {have} bytes, expected {expected} (Rows {rows} x Columns {cols} x "
                             f"BitsAllocated {bits} / 8): the file is truncated or damaged", path, "PixelData")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InputError(f"cannot decode pixel data with transfer syntax {syntax} ({type(exc).__name__}: {exc})",
                         path, "PixelData") from exc
    if pixels.shape != (rows, cols):
        raise InputError(f"pixel data shape {pixels.shape} is not Rows x Columns = {(rows, cols)}", path,
                         "PixelData")
    slope, intercept = 1.0, 0.0
    if rescaled:
        slope = get_float(ds, "RescaleSlope", path)
        if slope <= 0:
            raise InputError(f"must be positive, got {slope:g}", path, "RescaleSlope")
        intercept = get_float(ds, "RescaleIntercept", path)
    hu = pixels.astype(np.float64) * slope + intercept
    bad = ~(np.abs(hu) <= np.finfo(np.float32).max)  # NaN, inf, or inf once float32
    if bad.any():
        raise InputError(f"{int(bad.sum())} of {hu.size} voxels are not finite in float32 HU (RescaleSlope {slope:g}, "
                         f"RescaleIntercept {intercept:g})", path, "RescaleSlope")
    return hu.astype(np.float32)


def write_dicom_ct(
    patient: Patient,
    folder: "str | Path",
    *,
    patient_id: str = "IDS-ENGINE",
    patient_name: str | None = None,
    study_instance_uid: str | None = None,
    series_description: str = "ids-engine CT",
) -> list[Path]:
    """Write the patient's CT as one DICOM file per slice (``CT_0000.dcm``, ...).

    Pixels are stored as int16 with RescaleIntercept -1024 HU and RescaleSlope 1 HU
    (rounded to the nearest HU); when the CT's range exceeds int16 the slope grows so
    the range fits. Each file is written atomically.

    Parameters
    ----------
    patient : the patient; its ``frame_of_reference_uid`` is used when set, else a new one.
    folder : created if missing.
    patient_id, patient_name : written to PatientID and PatientName (PatientName defaults
        to ``patient.name``, which is a display name, never a real identifier).
    study_instance_uid : put the series into this study (a new one by default).
    series_description : SeriesDescription.

    Returns
    -------
    list of pathlib.Path
        The files in slice order (z increasing).
    """
    folder = Path(folder)
    grid = patient.grid
    nz, ny, nx = grid.shape_zyx
    dz, dy, dx = grid.spacing_mm_zyx
    ct = np.asarray(patient.ct_hu, dtype=np.float64)
    intercept = -1024.0
    lo, hi = float(ct.min()), float(ct.max())
    slope = float(ds_number(max(1.0, (hi - intercept) / 32767.0, (intercept - lo) / 32768.0)))
    stored = np.clip(np.rint((ct - intercept) / slope), -32768, 32767).astype(np.int16)

    frame = patient.frame_of_reference_uid or generate_uid()
    study = study_instance_uid or generate_uid()
    series = generate_uid()
    z_mm = grid.axis_mm("z")
    ox, oy, _ = grid.origin_mm_xyz
    paths = []
    for k in range(nz):
        ds = new_dataset(CTImageStorage, "CT")
        set_patient_and_study(ds, patient_name=patient_name if patient_name is not None else patient.name,
                              patient_id=patient_id, study_instance_uid=study)
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 1
        ds.SeriesDescription = series_description
        ds.PatientPosition = patient.patient_position
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.KVP = ""
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = ds_numbers([ox, oy, z_mm[k]])
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = ds_number(z_mm[k])
        ds.SliceThickness = ds_number(dz)
        ds.PixelSpacing = ds_numbers([dy, dx])
        ds.Rows = ny
        ds.Columns = nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = ds_number(intercept)
        ds.RescaleSlope = ds_number(slope)
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        paths.append(save_atomic(ds, folder / f"CT_{k:04d}.dcm"))
    return paths


def ct_slice_headers(ct_files: Sequence["str | Path"]) -> list[tuple[Path, Dataset]]:
    """Headers (no pixels) of CT files, for writers that reference them."""
    out = []
    for p in ct_files:
        ds = read_dataset(p, stop_before_pixels=True)
        check_modality(ds, p, "CT")
        out.append((Path(p), ds))
    if not out:
        raise InputError("no CT files given", None, "ct_files")
    return out


def match_slices(headers: list[tuple[Path, Dataset]], grid: Grid) -> list[tuple[Path, Dataset]]:
    """The CT header of each grid slice, in slice order (InputError if one is missing)."""
    z_mm = grid.axis_mm("z")
    tol = 0.1 * grid.spacing_mm_zyx[0]
    by_slice: list[tuple[Path, Dataset] | None] = [None] * len(z_mm)
    _, ny, nx = grid.shape_zyx
    dy, dx = grid.spacing_mm_zyx[1:]
    for p, ds in headers:
        if (get_int(ds, "Rows", p), get_int(ds, "Columns", p)) != (ny, nx):
            raise InputError(f"{ds.Rows} x {ds.Columns} pixels, the grid has {ny} x {nx}", p, "Rows")
        if not np.allclose(get_floats(ds, "PixelSpacing", p, count=2), (dy, dx), rtol=0, atol=_POSITION_TOL_MM):
            raise InputError(f"{list(ds.PixelSpacing)} mm differs from the grid's {[dy, dx]}", p, "PixelSpacing")
        position = get_floats(ds, "ImagePositionPatient", p, count=3)
        if not np.allclose(position[:2], grid.origin_mm_xyz[:2], rtol=0, atol=0.01):
            raise InputError(f"x, y {position[:2].tolist()} differ from the grid origin "
                             f"{list(grid.origin_mm_xyz[:2])}", p, "ImagePositionPatient")
        z = position[2]
        k = int(np.argmin(np.abs(z_mm - z)))
        if abs(z_mm[k] - z) > tol:
            raise InputError(f"slice z={z:g} mm is not on the grid ({grid.describe()})", p, "ImagePositionPatient")
        by_slice[k] = (p, ds)
    missing = [f"{z_mm[k]:g}" for k, h in enumerate(by_slice) if h is None]
    if missing:
        raise InputError(f"no CT file for grid slices at z = {', '.join(missing)} mm among {names([h[0] for h in headers])}",
                         headers[0][0].parent, "ImagePositionPatient")
    return by_slice  # type: ignore[return-value]
