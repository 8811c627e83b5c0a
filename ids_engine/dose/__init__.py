"""SVD pencil-beam dose engine: machine model, geometry cache, full and incremental dose, influence."""

from ._machine import PhotonMachine, default_6mv

__all__ = ["PhotonMachine", "default_6mv"]
