"""ids-engine: interactive dose shaping for IMRT planning.

Layers (imports point downward only): ``viewer`` -> ``cli``/``session`` -> ``dmr`` ->
``dose`` -> ``model``/``io``/``phantoms`` -> ``kernels`` -> ``backend``.
See docs/architecture.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
