"""DICOM in and out (pydicom): CT series, RT Structure Sets, RT Dose.

Only the standard image orientation ``[1, 0, 0, 0, 1, 0]`` is supported, which is the
axis-aligned :class:`~ids_engine.model.Grid`. The work is split into private modules:

* ``_dicom_common``: reading files, typed tag access with clear errors, atomic writes;
* ``_dicom_ct``: CT series;
* ``_dicom_contours``: polygons <-> masks (pure NumPy);
* ``_dicom_rtstruct``: RT Structure Sets;
* ``_dicom_rtdose``: RT Dose.

Every bad input raises :class:`~ids_engine.io.InputError` naming the file and the
field.
"""

from __future__ import annotations

from pathlib import Path

from ..model import Patient
from ._dicom_common import modality_of, scan_folder
from ._dicom_ct import ct_from_datasets, read_ct_series, write_dicom_ct
from ._dicom_rtdose import read_rtdose, write_rtdose
from ._dicom_rtstruct import read_rtstruct, rtstruct_frames, structures_from_dataset, write_rtstruct
from ._errors import InputError

__all__ = [
    "read_ct_series",
    "read_dicom",
    "read_rtdose",
    "read_rtstruct",
    "write_dicom_ct",
    "write_rtdose",
    "write_rtstruct",
]


def read_dicom(folder: "str | Path", *, series_instance_uid: str | None = None) -> Patient:
    """Read a patient from a folder: the CT series and its RT Structure Set.

    Every file directly inside ``folder`` is looked at once; files that are not DICOM are
    skipped. With one RTSTRUCT it is used (and must be in the CT's frame of reference);
    with several, the one in the CT's frame of reference is used (an error unless
    exactly one is); with none, the patient has no structures and
    :attr:`Patient.external` falls back to a CT threshold.

    Parameters
    ----------
    folder : the folder.
    series_instance_uid : pick this CT series when the folder holds several.

    Returns
    -------
    Patient
        Named ``"DICOM <n> slices"`` (never the DICOM PatientName, so no identifier
        reaches logs), with ``patient_position``, ``frame_of_reference_uid`` and
        ``meta`` = the CT meta of :func:`read_ct_series` plus ``rtstruct_file`` (str or
        None) and ``rtdose_files`` (RTDOSE files found in the folder, not read).

    Raises
    ------
    InputError
        Naming the file and the field (see :func:`read_ct_series` and
        :func:`read_rtstruct`); also several RTSTRUCTs none or more than one of which is
        in the CT's frame of reference.
    """
    folder = Path(folder)
    items = scan_folder(folder)
    ct_items = [(p, ds) for p, ds in items if modality_of(ds) == "CT"]
    if not ct_items:
        raise InputError("no CT image files in the folder", folder, "Modality")
    grid, ct_hu, meta = ct_from_datasets(ct_items, where=folder, series_instance_uid=series_instance_uid)
    frame = meta["frame_of_reference_uid"]

    rtstructs = [(p, ds) for p, ds in items if modality_of(ds) == "RTSTRUCT"]
    chosen = None
    if len(rtstructs) == 1:
        chosen = rtstructs[0]
    elif len(rtstructs) > 1:
        matching = [(p, ds) for p, ds in rtstructs if frame in rtstruct_frames(ds, p)]
        if len(matching) != 1:
            listed = ", ".join(p.name for p, _ in (matching or rtstructs))
            how_many = "none" if not matching else f"{len(matching)}"
            raise InputError(f"{len(rtstructs)} RTSTRUCT files and {how_many} of them in the CT's frame of "
                             f"reference {frame} ({listed}); keep one per folder", folder, "FrameOfReferenceUID")
        chosen = matching[0]
    structures = structures_from_dataset(chosen[1], chosen[0], grid, frame) if chosen else []

    meta = dict(meta)
    meta["rtstruct_file"] = str(chosen[0]) if chosen else None
    meta["rtdose_files"] = [str(p) for p, ds in items if modality_of(ds) == "RTDOSE"]
    try:
        return Patient(grid, ct_hu, tuple(structures), name=f"DICOM {grid.shape_zyx[0]} slices",
                       patient_position=meta["patient_position"], frame_of_reference_uid=frame, meta=meta)
    except ValueError as exc:
        raise InputError(str(exc), chosen[0] if chosen else folder, "StructureSetROISequence") from exc
