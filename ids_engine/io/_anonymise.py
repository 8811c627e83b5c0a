"""Anonymisation of DICOM files for sharing outside the clinic.

One :class:`Anonymiser` is used for all the files of one export, so that what links them
survives: the same input UID always becomes the same output UID (a plan still references
its structure set, the dose its plan, every file the CT's study and frame of reference),
the same patient ID the same pseudonym, and every date moves by the same number of days
(intervals are kept). The mapping is random per anonymiser (a secret salt), so it cannot
be reversed from the output.

What is changed, in every data set and every nested sequence item:

* UIDs (VR UI) other than well-known ones (SOP classes, transfer syntaxes, and other UIDs
  of the DICOM standard) -> new UIDs (``generate_uid`` from the salt and the old UID),
  including the file meta's MediaStorageSOPInstanceUID;
* person names (VR PN) -> ``ANONYMOUS`` (``PatientName``) or empty;
* ``PatientID`` -> ``ANON-<8 hex>``, ``OtherPatientIDs`` and similar removed;
* dates (VR DA, and the date part of DT) -> shifted by the same offset; birth dates emptied;
* identifying text (institution, addresses, accession number, study ID, device serial
  numbers, station names, comments...) -> emptied (Type 2 attributes stay present);
* private tags -> removed.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from pathlib import Path
from typing import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from ._dicom_common import read_dataset, save_atomic

__all__ = ["Anonymiser", "anonymise_files"]

# Emptied wherever they appear (text that may identify a person or a place).
_IDENTIFYING = (
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "AccessionNumber",
    "StudyID", "StudyDescription", "PatientAddress", "PatientTelephoneNumbers",
    "PatientBirthName", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "ImageComments", "DeviceSerialNumber", "RequestingService",
    "PhysiciansOfRecord", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence",
    "PatientBirthTime", "PatientAge", "PatientSize", "PatientWeight", "RequestAttributesSequence",
    "ReferencedPatientSequence", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "IssuerOfPatientID", "PatientBirthDate",
)
# Removed rather than emptied (not Type 2 in the RT modules, and an empty sequence says nothing).
_REMOVED = ("OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientInsurancePlanCodeSequence",
            "RequestAttributesSequence", "ReferencedPatientSequence", "PatientBirthTime", "MedicalRecordLocator")


class Anonymiser:
    """Consistent remapping of UIDs, patient IDs and dates across the files of one export.

    Parameters
    ----------
    salt : secret mixed into every new UID and pseudonym (random by default; give one to
        reproduce a mapping, e.g. in tests).
    date_shift_days : days added to every date (default: a random shift of 1 to 3650 days
        into the past, the same for every file of this anonymiser).
    patient_name : what PatientName becomes.
    """

    def __init__(self, *, salt: str | None = None, date_shift_days: int | None = None,
                 patient_name: str = "ANONYMOUS") -> None:
        self.salt = salt if salt is not None else secrets.token_hex(16)
        if date_shift_days is None:
            date_shift_days = -(1 + int.from_bytes(hashlib.sha256(self.salt.encode()).digest()[:4], "big") % 3650)
        self.date_shift_days = int(date_shift_days)
        self.patient_name = patient_name
        self.uids: dict[str, str] = {}
        self.patient_ids: dict[str, str] = {}

    # ---------------------------------------------------------------- values
    def uid(self, old: str) -> str:
        """The new UID for ``old`` (well-known DICOM UIDs are kept; the same ``old``, the same result)."""
        old = str(old).strip()
        if not old or UID(old).is_valid and UID(old).name != old:  # a registered UID: SOP class, syntax...
            return old
        if old not in self.uids:
            self.uids[old] = generate_uid(entropy_srcs=[self.salt, old])
        return self.uids[old]

    def patient_id(self, old: str) -> str:
        old = str(old).strip()
        if old not in self.patient_ids:
            digest = hashlib.sha256(f"{self.salt}|{old}".encode()).hexdigest()[:8].upper()
            self.patient_ids[old] = f"ANON-{digest}"
        return self.patient_ids[old]

    def date(self, old: str) -> str:
        """A DICOM DA string (YYYYMMDD) shifted by ``date_shift_days`` (unparseable -> empty)."""
        text = str(old).strip()
        if not text:
            return ""
        try:
            d = datetime.datetime.strptime(text[:8], "%Y%m%d").date()
        except ValueError:
            return ""
        return (d + datetime.timedelta(days=self.date_shift_days)).strftime("%Y%m%d")

    # ---------------------------------------------------------------- data sets
    def dataset(self, ds: Dataset) -> Dataset:
        """Anonymise ``ds`` in place (nested sequences included) and return it."""
        ds.remove_private_tags()
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.uid(meta.MediaStorageSOPInstanceUID)
        self._walk(ds)
        return ds

    def _walk(self, ds: Dataset) -> None:
        for kw in _REMOVED:
            if kw in ds:
                delattr(ds, kw)
        for elem in list(ds):
            kw = elem.keyword
            if elem.VR == "SQ":
                for item in elem.value:
                    self._walk(item)
                continue
            if elem.value is None or elem.value == "":
                continue
            if kw == "PatientID":
                elem.value = self.patient_id(elem.value)
            elif kw == "PatientName":
                elem.value = self.patient_name
            elif kw in _IDENTIFYING:
                elem.value = ""
            elif elem.VR == "UI":
                if elem.VM > 1:
                    elem.value = [self.uid(v) for v in elem.value]
                else:
                    elem.value = self.uid(elem.value)
            elif elem.VR == "PN":
                elem.value = ""
            elif elem.VR == "DA":
                elem.value = ([self.date(v) for v in elem.value] if elem.VM > 1 else self.date(elem.value))
            elif elem.VR == "DT":
                text = str(elem.value)
                elem.value = self.date(text[:8]) + text[8:] if self.date(text[:8]) else ""


def anonymise_files(paths: Iterable["str | Path"], anonymiser: Anonymiser | None = None, *,
                    out_folder: "str | Path | None" = None) -> list[Path]:
    """Anonymise DICOM files with one :class:`Anonymiser` (a new one by default).

    Parameters
    ----------
    paths : the files.
    anonymiser : share one across calls to keep the mapping of one export.
    out_folder : write the anonymised files here under their own names; None rewrites them
        in place (each atomically).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    anonymiser = anonymiser or Anonymiser()
    out = []
    for p in paths:
        p = Path(p)
        ds = anonymiser.dataset(read_dataset(p))
        target = Path(out_folder) / p.name if out_folder is not None else p
        out.append(save_atomic(ds, target))
    return out
