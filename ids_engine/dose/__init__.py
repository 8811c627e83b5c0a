"""SVD pencil-beam dose engine: machine model, geometry cache, full and incremental dose, influence."""

from ._engine import BeamGeometry, DoseEngine, EngineOptions, FluencePatch, calibrate, central_axis_ssd_mm
from ._influence import InfluenceMatrix, TwoLevelMatrix, influence_matrix
from ids_engine.model import PhotonMachine, default_6mv

__all__ = [
    "BeamGeometry",
    "DoseEngine",
    "EngineOptions",
    "FluencePatch",
    "InfluenceMatrix",
    "PhotonMachine",
    "TwoLevelMatrix",
    "calibrate",
    "central_axis_ssd_mm",
    "default_6mv",
    "influence_matrix",
]
