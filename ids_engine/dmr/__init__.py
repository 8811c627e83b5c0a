"""Dose modification and recovery (DMR), sections 2.2-2.3 and Algorithm 1 of the IDS paper."""

from ._modify import ModificationResult, Modifier, StepResult
from ._recovery import RecoveryOptions, RecoveryResult, Watch, distance_grid, modify_joint, recover
from ._requests import (
    EraseSpot,
    MoveIsodoseLine,
    MoveIsodoseSurface,
    Pin,
    Request,
    RequestError,
    SetVoxelDose,
    Unpin,
    check_run_options,
    request_fields,
    request_from_dict,
)
from ._repair import WIDE_LP_OPTIONS, RepairSettings, SideEffectRepair
from ._repair_lp import LPRepairOptions
from ._resolve import ResolveContext, Resolved, resolve
from ._tpi import tpi_maps

__all__ = [
    "EraseSpot",
    "LPRepairOptions",
    "ModificationResult",
    "Modifier",
    "MoveIsodoseLine",
    "MoveIsodoseSurface",
    "Pin",
    "RecoveryOptions",
    "RecoveryResult",
    "RepairSettings",
    "Request",
    "RequestError",
    "ResolveContext",
    "Resolved",
    "SetVoxelDose",
    "SideEffectRepair",
    "StepResult",
    "Unpin",
    "WIDE_LP_OPTIONS",
    "Watch",
    "check_run_options",
    "distance_grid",
    "modify_joint",
    "recover",
    "request_fields",
    "request_from_dict",
    "resolve",
    "tpi_maps",
]
