"""Shared DICOM helpers: reading files, typed tag access with clear errors, atomic writes.

Every failure here is an :class:`~ids_engine.io.InputError` that names the file and the
DICOM keyword at fault, never a bare pydicom traceback.
"""

from __future__ import annotations

import datetime
import os
import uuid
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from ._errors import InputError

__all__ = [
    "NotDicomError",
    "STANDARD_ORIENTATION",
    "check_modality",
    "check_standard_orientation",
    "copy_patient_and_study",
    "ds_number",
    "ds_numbers",
    "get_float",
    "get_floats",
    "get_int",
    "get_sequence",
    "get_str",
    "modality_of",
    "names",
    "new_dataset",
    "read_dataset",
    "save_atomic",
    "scan_folder",
    "set_patient_and_study",
]

# Rows along +x, columns along +y: the only orientation the Grid model represents.
STANDARD_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_ORIENTATION_TOL = 1e-4

# The field named when a file is not DICOM at all.
_FILE_FIELD = "File Meta Information"

_MISSING = object()

_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_BYTES = 128
# The sequence delimitation item (FFFE,E0DD) with length 0, little and big endian.
_SEQUENCE_DELIMITERS = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")
# The longest element header (explicit VR with a 4-byte length); pydicom stops quietly on a shorter tail.
_LONG_HEADER_BYTES = 12

# Storage classes the readers use: a file declaring one must carry a Modality.
_READ_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose Storage",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set Storage",
}


class NotDicomError(InputError):
    """A file that is not DICOM at all (a folder scan skips these; explicit paths do not)."""


# ------------------------------------------------------------------ reading
def _looks_like_raw_dicom(path: Path) -> bool:
    """Does the file start like a DICOM data set without preamble (group 0002 or 0008 tag)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00")


def _cut_in_preamble(path: Path) -> str | None:
    """Why a file that ends before its 'DICM' marker looks like a DICOM file cut short (else None).

    An empty ``*.dcm`` file, or a shorter-than-132-byte file of zero bytes followed by
    the start of 'DICM': a folder scan must not skip these as "not DICOM" (a CT slice or
    the structure set would vanish without a word).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE_BYTES + 4)
    except OSError:
        return None
    if len(head) >= _PREAMBLE_BYTES + 4:
        return None
    if not head:
        return "the file is empty" if path.suffix.lower() == ".dcm" else None
    if not any(head[:_PREAMBLE_BYTES]) and b"DICM".startswith(head[_PREAMBLE_BYTES:]):
        return (f"the file is truncated: {len(head)} bytes, inside the {_PREAMBLE_BYTES}-byte preamble and "
                "'DICM' marker")
    return None


def read_dataset(path: "str | Path", *, stop_before_pixels: bool = False) -> Dataset:
    """Read one DICOM file.

    Files in the DICOM file format (128-byte preamble and ``DICM``) are read as they
    are. Older files that start directly with a group 0002 or 0008 element (no
    preamble) are read too, provided they carry a ``SOPClassUID`` or ``Modality``.

    Parameters
    ----------
    path : the file.
    stop_before_pixels : skip the pixel data (for header scans).

    Returns
    -------
    pydicom.dataset.Dataset

    Raises
    ------
    NotDicomError
        The file is not DICOM (an :class:`InputError` naming the file).
    InputError
        The file does not exist, cannot be parsed or is cut short (its last element
        ends past the end of the file, it ends inside an element header or the
        preamble, it has no data elements, or its file meta names a CT, RTSTRUCT or
        RTDOSE storage class but it has no Modality).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file", p, _FILE_FIELD)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=stop_before_pixels)
        _check_complete(ds, p, stop_before_pixels=stop_before_pixels)
        return ds
    except InputError:
        raise
    except InvalidDicomError as exc:
        cut_short = _cut_in_preamble(p)
        if cut_short:
            raise InputError(cut_short, p, _FILE_FIELD) from exc
        if not _looks_like_raw_dicom(p):
            raise NotDicomError(
                "not a DICOM file (no 'DICM' marker after the 128-byte preamble)", p, _FILE_FIELD
            ) from exc
    except Exception as exc:  # pydicom raises many kinds for truncated or corrupt files
        raise InputError(f"cannot be read as DICOM ({type(exc).__name__}: {exc})", p, _FILE_FIELD) from exc
    # Preamble-less file that starts like a data set: read it forcibly, quietly.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, force=True)
            ok = "SOPClassUID" in ds or "Modality" in ds
    except Exception as exc:
        raise NotDicomError(f"not a DICOM file ({type(exc).__name__}: {exc})", p, _FILE_FIELD) from exc
    if not ok:
        raise NotDicomError("not a DICOM file (no SOPClassUID or Modality)", p, _FILE_FIELD)
    _check_complete(ds, p, stop_before_pixels=stop_before_pixels)
    return ds


def _check_complete(ds: Dataset, path: Path, *, stop_before_pixels: bool) -> None:
    """Refuse a file cut short (pydicom reads what is there and stops quietly at the end).

    The data set must not be empty; its last element must end within the file and not
    be followed by a partial element header; a last element of undefined length
    (encapsulated pixel data, a sequence) must end with the file's last 8 bytes, its
    sequence delimiter; and a file whose file meta declares a storage class this
    package reads must carry its Modality: without it a folder scan would skip the file
    and, say, a CT slice would vanish.
    """
    tags = list(ds.keys())
    if not tags:
        raise InputError("no data elements after the file meta information: the file is empty or truncated",
                         path, _FILE_FIELD)
    last = ds.get_item(tags[-1])
    keyword = pydicom.datadict.keyword_for_tag(last.tag) or str(last.tag)
    length = getattr(last, "length", None)
    value_tell = getattr(last, "value_tell", None)
    if (length == _UNDEFINED_LENGTH or getattr(last, "is_undefined_length", False)) and not stop_before_pixels:
        # Ended by a sequence delimitation item, which must then be the end of the file.
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 8))
            tail = f.read(8)
        if tail not in _SEQUENCE_DELIMITERS:
            raise InputError("the file is truncated: it ends before the sequence delimiter of its last element",
                             path, keyword)
    elif isinstance(length, int) and isinstance(value_tell, int):
        size = path.stat().st_size
        end = value_tell + length
        if end > size:
            raise InputError(f"the file is truncated: {max(0, size - value_tell)} of the {length} bytes of its last "
                             f"element are present ({size} bytes in the file, {end} expected)", path, keyword)
        if 0 < size - end < _LONG_HEADER_BYTES:
            raise InputError(f"the file is truncated: it ends {size - end} bytes into the header of the element "
                             f"after {keyword}", path, keyword)
    sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop_class in _READ_SOP_CLASSES and not str(ds.get("Modality", "") or "").strip():
        raise InputError(f"required tag is missing, though the file meta says {_READ_SOP_CLASSES[sop_class]}: "
                         "the file is truncated or incomplete", path, "Modality")


def modality_of(ds: Dataset) -> str:
    """The Modality of a data set, upper case ("" when absent or unreadable; for sorting a folder)."""
    try:
        return str(ds.get("Modality", "")).strip().upper()
    except Exception:
        return ""


def scan_folder(folder: "str | Path", *, stop_before_pixels: bool = False) -> list[tuple[Path, Dataset]]:
    """Read every DICOM file directly inside ``folder`` (not recursive), sorted by name.

    Files that are not DICOM (text notes, images, hidden files such as the temporary
    files of an interrupted write) are skipped; DICOM files that cannot be parsed are
    errors.

    Returns
    -------
    list of (path, dataset)
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError("no such folder", root, _FILE_FIELD)
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            out.append((p, read_dataset(p, stop_before_pixels=stop_before_pixels)))
        except NotDicomError:
            continue
    return out


# --------------------------------------------------------------- tag access
def _raw(ds: Dataset, keyword: str, path, default=_MISSING) -> Any:
    """The value of ``keyword``; a missing or empty value gives ``default`` or an error."""
    try:
        present = keyword in ds
        value = ds[keyword].value if present else None
    except Exception as exc:
        raise InputError(f"cannot be read ({type(exc).__name__}: {exc})", path, keyword) from exc
    empty = value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0)
    if not present or empty:
        if default is _MISSING:
            raise InputError("required tag is missing or empty", path, keyword)
        return default
    return value


def get_str(ds: Dataset, keyword: str, path, default=_MISSING) -> str:
    """A string tag, stripped (``default`` when missing or empty, else an error)."""
    value = _raw(ds, keyword, path, default)
    if value is default and default is not _MISSING:
        return value
    return str(value).strip()


def get_float(ds: Dataset, keyword: str, path, default=_MISSING) -> float:
    """A single finite number (DS, FD, IS...)."""
    value = _raw(ds, keyword, path, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) != 1:
            raise InputError(f"expected one number, got {len(value)}", path, keyword)
        value = value[0]
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"not a number: {value!r}", path, keyword) from exc
    if not np.isfinite(v):
        raise InputError(f"not a finite number: {value!r}", path, keyword)
    return v


def get_int(ds: Dataset, keyword: str, path, default=_MISSING) -> int:
    """A single integer."""
    v = get_float(ds, keyword, path, default)
    if v is default and default is not _MISSING:
        return v
    if v != int(v):
        raise InputError(f"expected an integer, got {v}", path, keyword)
    return int(v)


def get_floats(ds: Dataset, keyword: str, path, count: int | None = None, default=_MISSING) -> np.ndarray:
    """A multi-valued numeric tag as a float64 array, optionally of exactly ``count`` values."""
    value = _raw(ds, keyword, path, default)
    if value is default and default is not _MISSING:
        return value
    if not isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = [value]
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"not a list of numbers ({exc})", path, keyword) from exc
    if count is not None and arr.size != count:
        raise InputError(f"expected {count} values, got {arr.size}", path, keyword)
    if not np.all(np.isfinite(arr)):
        raise InputError("values must be finite numbers", path, keyword)
    return arr


def get_sequence(ds: Dataset, keyword: str, path, required: bool = True) -> list[Dataset]:
    """The items of a sequence (an empty list when optional and absent)."""
    value = _raw(ds, keyword, path, _MISSING if required else None)
    if value is None:
        return []
    if not isinstance(value, pydicom.sequence.Sequence):
        raise InputError("expected a sequence", path, keyword)
    return list(value)


def check_modality(ds: Dataset, path, expected: str) -> None:
    """Refuse a file of another modality, naming the field ``Modality``."""
    modality = get_str(ds, "Modality", path).upper()
    if modality != expected:
        raise InputError(f"the file is {modality}, expected {expected}", path, "Modality")


def check_standard_orientation(ds: Dataset, path) -> None:
    """Refuse anything but ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``."""
    iop = get_floats(ds, "ImageOrientationPatient", path, count=6)
    if np.allclose(iop, STANDARD_ORIENTATION, atol=_ORIENTATION_TOL):
        return
    axis_aligned = np.all(np.isclose(np.abs(iop), 0.0, atol=_ORIENTATION_TOL)
                          | np.isclose(np.abs(iop), 1.0, atol=_ORIENTATION_TOL))
    shown = "[" + ", ".join(f"{v:g}" for v in iop) + "]"
    if axis_aligned:
        why = (f"{shown} is axis-aligned but flipped or rotated; only the standard orientation "
               "[1, 0, 0, 0, 1, 0] (rows along +x, columns along +y) is supported")
    else:
        why = f"{shown} is oblique; only the standard orientation [1, 0, 0, 0, 1, 0] is supported"
    raise InputError(why, path, "ImageOrientationPatient")


# ------------------------------------------------------------------ writing
def ds_number(value: float) -> str:
    """A finite number as a DICOM DS string (at most 16 characters)."""
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"cannot write non-finite number {value!r} as DICOM DS")
    s = format(v, ".10g")
    return s if len(s) <= 16 else format_number_as_ds(v)


def ds_numbers(values: Iterable[float]) -> list[str]:
    """Numbers as DICOM DS strings."""
    return [ds_number(v) for v in values]


def new_dataset(sop_class_uid: str, modality: str, *, sop_instance_uid: str | None = None) -> Dataset:
    """A data set with file meta (Explicit VR Little Endian), SOP common and date fields."""
    uid = sop_instance_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = uid
    ds.Modality = modality
    now = datetime.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer = "ids-engine"
    return ds


def copy_patient_and_study(target: Dataset, source: Dataset) -> None:
    """Copy the Patient and General Study modules (identifiers included) from ``source``."""
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "ReferringPhysicianName", "AccessionNumber", "StudyDescription"):
        if kw in source:
            setattr(target, kw, source[kw].value)


def set_patient_and_study(target: Dataset, *, patient_name: str, patient_id: str, study_instance_uid: str) -> None:
    """Fill the Patient and General Study modules for a new study."""
    now = datetime.datetime.now()
    target.PatientName = patient_name
    target.PatientID = patient_id
    target.PatientBirthDate = ""
    target.PatientSex = ""
    target.StudyInstanceUID = study_instance_uid
    target.StudyDate = now.strftime("%Y%m%d")
    target.StudyTime = now.strftime("%H%M%S")
    target.StudyID = "1"
    target.ReferringPhysicianName = ""
    target.AccessionNumber = ""


def save_atomic(ds: Dataset, path: "str | Path") -> Path:
    """Write ``ds`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file; an interrupted write leaves at most a hidden
    ``.<name>.*.tmp`` file, which folder scans skip.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
    # os.open with 0o666 lets the umask set the mode, as for any new file (mkstemp would give 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def names(paths: Sequence["str | Path"]) -> str:
    """File names for messages (base names, comma-separated)."""
    return ", ".join(Path(p).name for p in paths)
