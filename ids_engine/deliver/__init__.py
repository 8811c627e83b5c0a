"""Deliverable plans: MLC apertures, segments, sequenced beams (shared by forward planning,
sequencing and DICOM RT export); leaf sequencing of fluence maps."""

from ._deliverable import (
    DEFAULT_TONGUE_GROOVE_MM,
    DeliverableCheck,
    check_deliverable,
    deliverable_fluences,
    reoptimise_weights,
    segment_fluence,
    segment_influence,
)
from ._sequencing import (
    IntegerSegment,
    LeafMatrix,
    SequencedFluence,
    SequencingError,
    complexity,
    decompose,
    leaf_matrix,
    sequence_beam,
    sequence_fluence,
    sequence_plan,
)
from ._types import Aperture, DeliverablePlan, Segment, SequencedBeam, aperture_fluence

__all__ = [
    "DEFAULT_TONGUE_GROOVE_MM",
    "Aperture",
    "DeliverableCheck",
    "DeliverablePlan",
    "IntegerSegment",
    "LeafMatrix",
    "Segment",
    "SequencedBeam",
    "SequencedFluence",
    "SequencingError",
    "aperture_fluence",
    "check_deliverable",
    "deliverable_fluences",
    "reoptimise_weights",
    "segment_fluence",
    "segment_influence",
    "complexity",
    "decompose",
    "leaf_matrix",
    "sequence_beam",
    "sequence_fluence",
    "sequence_plan",
]
