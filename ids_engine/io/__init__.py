"""Reading and writing patients and plans: DICOM (pydicom) and matRad .mat files."""

from ._errors import InputError

__all__ = ["InputError"]
