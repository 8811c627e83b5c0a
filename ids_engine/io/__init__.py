"""Reading and writing patients and plans: DICOM (pydicom) and matRad .mat files.

Every reader raises :class:`InputError` naming the file and the field for bad input.
"""

from ._dicom import read_ct_series, read_dicom, read_rtdose, read_rtstruct, write_dicom_ct, write_rtdose, write_rtstruct
from ._errors import InputError, read_toml
from ._matrad import read_matrad_machine, read_matrad_phantom

__all__ = [
    "InputError",
    "read_ct_series",
    "read_dicom",
    "read_matrad_machine",
    "read_matrad_phantom",
    "read_rtdose",
    "read_rtstruct",
    "read_toml",
    "write_dicom_ct",
    "write_rtdose",
    "write_rtstruct",
]

# DICOM RT Plan export and import, complete RT sets, anonymisation, Elekta Transa (issue 13).
from ._anonymise import Anonymiser, anonymise_files  # noqa: E402
from ._dicom_export import (  # noqa: E402
    ExportedSet,
    RTSet,
    dose_agreement,
    export_rt_set,
    missing_required_attributes,
    open_field_segments,
    plan_dose,
    plan_fluences,
    read_rt_set,
)
from ._dicom_rtplan import RESEARCH_USE_ONLY, ImportedRTPlan, read_rtplan, write_rtplan  # noqa: E402

__all__ += [
    "Anonymiser",
    "ExportedSet",
    "ImportedRTPlan",
    "RESEARCH_USE_ONLY",
    "RTSet",
    "anonymise_files",
    "dose_agreement",
    "export_rt_set",
    "missing_required_attributes",
    "open_field_segments",
    "plan_dose",
    "plan_fluences",
    "read_rt_set",
    "read_rtplan",
    "write_rtplan",
]
from ._transa import (  # noqa: E402
    TRANSA_CONFIG_NAME,
    TransaConfig,
    find_transa_config,
    read_transa_config,
    read_transa_plan,
    transa_patient_id,
    write_transa,
)

__all__ += ["TRANSA_CONFIG_NAME", "TransaConfig", "find_transa_config", "read_transa_config", "read_transa_plan",
            "transa_patient_id", "write_transa"]
