"""Planning tools: beam set-ups and starting fluences."""

from ._open_field import conformal_aperture, equispaced_beams

__all__ = ["conformal_aperture", "equispaced_beams"]
