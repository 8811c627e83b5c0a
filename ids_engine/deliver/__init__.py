"""Deliverable plans: MLC apertures, segments, sequenced beams (shared by forward planning,
sequencing and DICOM RT export); leaf sequencing of fluence maps."""

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
    "Aperture",
    "DeliverablePlan",
    "IntegerSegment",
    "LeafMatrix",
    "Segment",
    "SequencedBeam",
    "SequencedFluence",
    "SequencingError",
    "aperture_fluence",
    "complexity",
    "decompose",
    "leaf_matrix",
    "sequence_beam",
    "sequence_fluence",
    "sequence_plan",
]
