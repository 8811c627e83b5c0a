"""RT Dose: read a dose grid and resample it onto the CT grid; write dose on a grid."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import RTDoseStorage, RTPlanStorage, generate_uid

from ..model import Grid
from ._dicom_common import (
    check_modality,
    check_standard_orientation,
    copy_patient_and_study,
    ds_number,
    ds_numbers,
    get_float,
    get_floats,
    get_int,
    get_str,
    new_dataset,
    read_dataset,
    save_atomic,
    set_patient_and_study,
)
from ._errors import InputError

__all__ = ["read_rtdose", "write_rtdose"]

# CT voxel centres this close (mm) to the dose grid's outer centres count as inside.
_EDGE_TOL_MM = 1e-4


def read_rtdose(path: "str | Path", grid: Grid, frame_of_reference_uid: str | None = None) -> np.ndarray:
    """Read an RT Dose file and resample it onto the CT grid.

    The dose at each CT voxel centre is the trilinear interpolation of the dose grid
    (values at dose-voxel centres); CT voxels outside the dose grid get 0. Trilinear
    interpolation on axis-aligned grids factorises into three 1-D linear
    interpolations, which is how it is computed (no per-voxel coordinate arrays).

    Parameters
    ----------
    path : the RTDOSE file (DoseUnits GY, standard orientation).
    grid : the CT grid.
    frame_of_reference_uid : the CT's; when given, the dose must be in it.

    Returns
    -------
    numpy.ndarray
        float32, shape ``grid.shape_zyx`` (z, y, x), dose in Gy.

    Raises
    ------
    InputError
        Naming the file and the field: not DICOM, not RTDOSE, DoseUnits other than GY,
        another frame of reference, an orientation other than ``[1, 0, 0, 0, 1, 0]``, a
        GridFrameOffsetVector that does not match the frames or is not monotonic,
        missing tags.
    """
    path = Path(path)
    ds = read_dataset(path)
    check_modality(ds, path, "RTDOSE")
    units = get_str(ds, "DoseUnits", path).upper()
    if units != "GY":
        raise InputError(f"{units!r} is not supported; only absolute dose in GY", path, "DoseUnits")
    if frame_of_reference_uid:
        frame = get_str(ds, "FrameOfReferenceUID", path)
        if frame != frame_of_reference_uid:
            raise InputError(f"the dose is in frame of reference {frame}, the CT in {frame_of_reference_uid}",
                             path, "FrameOfReferenceUID")
    check_standard_orientation(ds, path)
    origin = get_floats(ds, "ImagePositionPatient", path, count=3)
    dy, dx = get_floats(ds, "PixelSpacing", path, count=2)
    if dy <= 0 or dx <= 0:
        raise InputError(f"must be positive, got {[dy, dx]}", path, "PixelSpacing")
    rows, cols = get_int(ds, "Rows", path), get_int(ds, "Columns", path)
    frames = get_int(ds, "NumberOfFrames", path, default=1)
    scaling = get_float(ds, "DoseGridScaling", path)
    offsets = get_floats(ds, "GridFrameOffsetVector", path, default=None)
    if offsets is None:
        if frames != 1:
            raise InputError(f"required for {frames} frames", path, "GridFrameOffsetVector")
        offsets = np.zeros(1)
    if offsets.size != frames:
        raise InputError(f"{offsets.size} offsets for {frames} frames", path, "GridFrameOffsetVector")
    # PS3.3 C.8.8.3.2: offsets relative to ImagePositionPatient when the first is 0,
    # else (the older form) absolute z positions starting at ImagePositionPatient z.
    if offsets[0] == 0:
        z_dose = origin[2] + offsets
    elif abs(offsets[0] - origin[2]) <= 1e-3:
        z_dose = offsets.copy()
    else:
        raise InputError(f"first offset {offsets[0]:g} is neither 0 (relative) nor ImagePositionPatient z "
                         f"{origin[2]:g} (absolute)", path, "GridFrameOffsetVector")
    steps = np.diff(z_dose)
    if frames > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
        raise InputError("offsets must be strictly increasing or decreasing", path, "GridFrameOffsetVector")

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError("required tag is missing", path, "PixelData")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise InputError(f"cannot decode pixel data ({type(exc).__name__}: {exc})", path, "PixelData") from exc
    if pixels.size != frames * rows * cols:
        raise InputError(f"pixel data holds {pixels.size} values, not NumberOfFrames x Rows x Columns = "
                         f"{frames} x {rows} x {cols}", path, "PixelData")
    dose = pixels.reshape(frames, rows, cols).astype(np.float64) * scaling
    if frames > 1 and steps[0] < 0:
        dose, z_dose = dose[::-1], z_dose[::-1]

    x_dose = origin[0] + dx * np.arange(cols)
    y_dose = origin[1] + dy * np.arange(rows)
    out = _resample_axis(dose, z_dose, grid.axis_mm("z"), axis=0)
    out = _resample_axis(out, y_dose, grid.axis_mm("y"), axis=1)
    out = _resample_axis(out, x_dose, grid.axis_mm("x"), axis=2)
    return out.astype(np.float32)


def _resample_axis(values: np.ndarray, source_mm: np.ndarray, target_mm: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along one axis from increasing sample positions; 0 outside."""
    n = source_mm.size
    inside = (target_mm >= source_mm[0] - _EDGE_TOL_MM) & (target_mm <= source_mm[-1] + _EDGE_TOL_MM)
    frac = np.interp(target_mm, source_mm, np.arange(n, dtype=np.float64))
    near = np.rint(frac)
    frac = np.where(np.abs(frac - near) < 1e-6, near, frac)  # sit exactly on a sample when it is one
    if n == 1:
        i0 = np.zeros(target_mm.size, dtype=np.int64)
        w = np.zeros(target_mm.size)
    else:
        i0 = np.clip(np.floor(frac).astype(np.int64), 0, n - 2)
        w = frac - i0
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * values.ndim
    shape[axis] = target_mm.size
    w = w.reshape(shape)
    out = np.take(values, i0, axis=axis) * (1.0 - w) + np.take(values, i1, axis=axis) * w
    return out * inside.reshape(shape)


def write_rtdose(
    dose_gy: np.ndarray,
    grid: Grid,
    path: "str | Path",
    frame_of_reference_uid: str | None = None,
    *,
    ct_files: Sequence["str | Path"] | None = None,
    rtplan_sop_instance_uid: str | None = None,
    dose_summation_type: str = "PLAN",
) -> Path:
    """Write a dose distribution on ``grid`` as a multi-frame RT Dose file.

    Pixels are uint32 with DoseGridScaling = max dose / (2^32 - 1), so the stored dose
    is exact to about 1e-9 of the maximum. GridFrameOffsetVector is relative (starts at
    0). The file is written atomically.

    Parameters
    ----------
    dose_gy : float array, shape ``grid.shape_zyx`` (z, y, x), Gy, finite and >= 0.
    grid : where the dose lives (ImagePositionPatient is its origin).
    path : the file to write.
    frame_of_reference_uid : FrameOfReferenceUID (the CT's); None takes the one of
        ``ct_files`` (a built-in phantom has none until its CT is written with
        :func:`write_dicom_ct`, whose files then give it).
    ct_files : CT slices to copy the patient and study modules from (so the dose joins
        the CT's study); a new study when None.
    rtplan_sop_instance_uid : the plan this dose belongs to (ReferencedRTPlanSequence).
    dose_summation_type : DoseSummationType (PLAN, BEAM, FRACTION...).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != grid.shape_zyx:
        raise ValueError(f"dose_gy shape {dose.shape} does not match grid shape {grid.shape_zyx}")
    if not np.all(np.isfinite(dose)) or dose.min() < 0:
        raise ValueError("dose_gy must be finite and >= 0")
    ct = None
    if ct_files:
        ct = read_dataset(ct_files[0], stop_before_pixels=True)
        check_modality(ct, ct_files[0], "CT")
        ct_frame = get_str(ct, "FrameOfReferenceUID", ct_files[0])
        if frame_of_reference_uid and frame_of_reference_uid != ct_frame:
            raise InputError(f"the CT is in frame of reference {ct_frame}, the dose was to be in "
                             f"{frame_of_reference_uid}", ct_files[0], "FrameOfReferenceUID")
        frame_of_reference_uid = ct_frame
    if not frame_of_reference_uid:
        raise ValueError("write_rtdose: no frame of reference: give frame_of_reference_uid or the CT's files "
                         "(for a phantom, write its CT first with write_dicom_ct and pass ct_files)")
    nz, ny, nx = grid.shape_zyx
    dz, dy, dx = grid.spacing_mm_zyx
    peak = float(dose.max())
    scaling = float(ds_number(peak / 4294967295.0)) if peak > 0 else 1.0
    stored = np.clip(np.rint(dose / scaling), 0, 4294967295).astype("<u4")

    ds = new_dataset(RTDoseStorage, "RTDOSE")
    if ct is not None:
        copy_patient_and_study(ds, ct)
    if "StudyInstanceUID" not in ds:
        set_patient_and_study(ds, patient_name="", patient_id="IDS-ENGINE", study_instance_uid=generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.SeriesDescription = "ids-engine dose"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ds_numbers(grid.origin_mm_xyz)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ds_numbers([dy, dx])
    ds.SliceThickness = ds_number(dz)
    ds.Rows = ny
    ds.Columns = nx
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = ds_numbers(dz * np.arange(nz))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = dose_summation_type
    ds.DoseGridScaling = ds_number(scaling)
    if rtplan_sop_instance_uid:
        plan_ref = Dataset()
        plan_ref.ReferencedSOPClassUID = RTPlanStorage
        plan_ref.ReferencedSOPInstanceUID = rtplan_sop_instance_uid
        ds.ReferencedRTPlanSequence = DicomSequence([plan_ref])
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return save_atomic(ds, path)
