"""Adaptive replanning (issue 14; claims 1-11 of seed 003): an approved plan carried onto a
new CT of the same patient, the difference quantified, auto-qualified within a tolerance
profile, batches on Dask.

* :func:`load_approved_plan`: the approved plan (session folder or ``ids plan --out`` folder):
  goals, beams, prescription, fluence and shaping requests are the pre-set values (claim 2).
* :func:`adapt_plan`: recompute it on the new anatomy, re-optimise warm-started for the
  approved goals, replay its shaping requests mapped through the registration
  (:func:`map_requests`), quantify (:func:`compare_doses`) and qualify (:func:`qualify`,
  :func:`read_tolerance`).
* :func:`run_adaptation`: ``ids adapt`` end to end (registration, contour transfer, outputs).
* :func:`adapt_batch`: several adaptations as Dask tasks (a LocalCluster or a scheduler address).

Registration and contour transfer come from :mod:`ids_engine.registration`.
"""

from ._adapt import (
    AdaptOptions,
    AdaptResult,
    adapt_plan,
    beam_angles_following,
    derived_goals,
    fluence_on_grid,
    mapped_beams,
)
from ._approved import AdaptError, ApprovedPlan, load_approved_plan
from ._batch import adapt_batch
from ._compare import DVH_METRICS, compare_doses, structure_metrics
from ._qualify import Qualification, qualify
from ._replay import MappedRequest, map_request, map_requests
from ._run import REGISTRATIONS, NewCT, load_new_ct, register, run_adaptation
from ._tolerance import Limit, ToleranceProfile, default_tolerance, read_tolerance

__all__ = [
    "DVH_METRICS",
    "REGISTRATIONS",
    "AdaptError",
    "AdaptOptions",
    "AdaptResult",
    "ApprovedPlan",
    "Limit",
    "MappedRequest",
    "NewCT",
    "Qualification",
    "ToleranceProfile",
    "adapt_batch",
    "adapt_plan",
    "beam_angles_following",
    "compare_doses",
    "default_tolerance",
    "derived_goals",
    "fluence_on_grid",
    "load_approved_plan",
    "load_new_ct",
    "map_request",
    "map_requests",
    "mapped_beams",
    "qualify",
    "read_tolerance",
    "register",
    "run_adaptation",
    "structure_metrics",
]
