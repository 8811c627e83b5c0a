"""Deliverable plans: MLC apertures, segments, sequenced beams (shared by forward planning,
sequencing and DICOM RT export)."""

from ._types import Aperture, DeliverablePlan, Segment, SequencedBeam, aperture_fluence

__all__ = ["Aperture", "DeliverablePlan", "Segment", "SequencedBeam", "aperture_fluence"]
