"""Reading and writing patients and plans: DICOM (pydicom) and matRad .mat files.

Every reader raises :class:`InputError` naming the file and the field for bad input.
"""

from ._dicom import read_ct_series, read_dicom, read_rtdose, read_rtstruct, write_dicom_ct, write_rtdose, write_rtstruct
from ._errors import InputError
from ._matrad import read_matrad_machine, read_matrad_phantom

__all__ = [
    "InputError",
    "read_ct_series",
    "read_dicom",
    "read_matrad_machine",
    "read_matrad_phantom",
    "read_rtdose",
    "read_rtstruct",
    "write_dicom_ct",
    "write_rtdose",
    "write_rtstruct",
]
