"""Registration of a new CT to the planning CT, contour transfer and test cases (seed 003, claims 3-6, 9-12).

Frames: points are DICOM patient coordinates (x, y, z) mm; volumes (z, y, x) on a
:class:`~ids_engine.model.Grid`. A :class:`Registration` maps planning -> new
(``x_new = R @ x_planning + t``, then an optional displacement field); see
:mod:`ids_engine.registration._registration` for the field conventions and
:mod:`ids_engine.registration._sitk` for which image is fixed (the new CT).
"""

from ._fiducials import locate_markers, match_markers, read_fiducials, register_fiducials, write_fiducials
from ._registration import (
    Registration,
    RegistrationError,
    identity_registration,
    invert_displacement,
    rotation_angles_deg,
    rotation_matrix,
)
from ._sitk import RegistrationCancelled, fov_mask, register_deformable, register_rigid
from ._transfer import merge_limited_fov, transfer_structures
from ._variants import Variant, make_variant, variant_from_spec

__all__ = [
    "Registration",
    "RegistrationCancelled",
    "RegistrationError",
    "Variant",
    "fov_mask",
    "identity_registration",
    "invert_displacement",
    "locate_markers",
    "make_variant",
    "match_markers",
    "merge_limited_fov",
    "read_fiducials",
    "register_deformable",
    "register_fiducials",
    "register_rigid",
    "rotation_angles_deg",
    "rotation_matrix",
    "transfer_structures",
    "variant_from_spec",
    "write_fiducials",
]
