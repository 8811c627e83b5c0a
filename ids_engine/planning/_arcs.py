"""Arcs: gantry angles along an arc, and arcs simulated by static beams.

An arc starts at a gantry angle, runs clockwise (``"CW"``, the IEC 61217 gantry angle
increasing: clockwise seen from the foot of the couch) or counter-clockwise (``"CC"``,
decreasing) over a length of at most 360 degrees.

Two ways of placing static beams on an arc, as the seed describes them:

* :func:`arc_angles` - "Make Conformed Beams": a beam at the start and then one every
  ``increment`` degrees; generation stops when the next beam would go beyond the arc length,
  and a full circle does not repeat its start (0 and 360 are not duplicated): start 0,
  length 360, increment 40 gives 0, 40, ..., 320.
* :class:`Arc` - a rotating beam simulated with fixed beams (the plan's "rotation
  increment"): the plan-wide increment is adjusted per arc to ``length / n`` with
  ``n = max(1, ceil(length / increment))`` (the spacing never exceeds the plan's increment)
  so that the arc is simulated with equally spaced fixed beams, each standing for an equal share of the arc's monitor units. By default
  (``rule="midpoint"``) the n beams sit at the middle of n equal sub-arcs (the midpoint rule
  of the integral over the arc; for a full circle, n beams equally spaced, half a spacing from
  the start). ``rule="ends"`` puts n + 1 beams at the sub-arc ends, the two end beams with
  half the weight of the others (the trapezoid rule); a full circle then has n equal beams
  starting at the start angle, 0 and 360 not duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ids_engine.model import Beam

__all__ = ["Arc", "arc_angles", "arc_direction", "simulate_arcs"]

_TOL = 1e-9


def arc_direction(direction: str) -> int:
    """+1 for clockwise (``"CW"``, gantry angle increasing), -1 for counter-clockwise
    (``"CC"`` or ``"CCW"``)."""
    d = str(direction).strip().upper()
    if d in ("CW", "CLOCKWISE"):
        return 1
    if d in ("CC", "CCW", "COUNTERCLOCKWISE", "COUNTER-CLOCKWISE"):
        return -1
    raise ValueError(f"arc direction {direction!r} is not CW or CC")


def _check_length(length_deg: float) -> float:
    length = float(length_deg)
    if not np.isfinite(length) or not 0.0 <= length <= 360.0:
        raise ValueError(f"arc length must lie in [0, 360] degrees, got {length_deg!r}")
    return length


def _check_increment(increment_deg: float) -> float:
    inc = float(increment_deg)
    if not np.isfinite(inc) or inc <= 0:
        raise ValueError(f"arc increment must be a positive number of degrees, got {increment_deg!r}")
    return inc


def arc_angles(start_deg: float, length_deg: float, increment_deg: float, direction: str = "CW") -> np.ndarray:
    """Gantry angles (degrees in [0, 360)) of the seed's "Make Conformed Beams": ``start``,
    then every ``increment`` along the arc while the next angle stays within the arc's
    length; a full circle does not repeat its start."""
    sign = arc_direction(direction)
    length = _check_length(length_deg)
    inc = _check_increment(increment_deg)
    n = int(np.floor(length / inc + _TOL)) + 1
    steps = inc * np.arange(n)
    if length >= 360.0 - _TOL:
        steps = steps[steps < 360.0 - _TOL]
    return (float(start_deg) + sign * steps) % 360.0


@dataclass(frozen=True)
class Arc:
    """A rotating beam: ``beam`` (its gantry angle is the arc's start; the other settings are
    shared by every static beam) turning ``length_deg`` in ``direction``."""

    beam: Beam
    length_deg: float
    direction: str = "CW"

    def __post_init__(self) -> None:
        object.__setattr__(self, "length_deg", _check_length(self.length_deg))
        object.__setattr__(self, "direction", "CW" if arc_direction(self.direction) > 0 else "CC")

    @property
    def start_deg(self) -> float:
        return self.beam.gantry_deg

    @property
    def stop_deg(self) -> float:
        return (self.start_deg + arc_direction(self.direction) * self.length_deg) % 360.0

    def n_sub_arcs(self, increment_deg: float) -> int:
        """How many equal sub-arcs simulate the arc at the plan's increment: the fewest whose
        spacing does not exceed it."""
        inc = _check_increment(increment_deg)
        return max(1, int(np.ceil(self.length_deg / inc - _TOL)))

    def spacing_deg(self, increment_deg: float) -> float:
        """The increment adjusted to this arc: ``length / n`` (the spacing of its static beams)."""
        return self.length_deg / self.n_sub_arcs(increment_deg)

    def static_angles(self, increment_deg: float, rule: str = "midpoint") -> tuple[np.ndarray, np.ndarray]:
        """(gantry angles in [0, 360), weights summing to 1) of the static beams simulating the arc."""
        n = self.n_sub_arcs(increment_deg)
        step = self.length_deg / n
        sign = arc_direction(self.direction)
        if self.length_deg == 0.0:
            return np.array([self.start_deg % 360.0]), np.array([1.0])
        if rule == "midpoint":
            offsets = step * (np.arange(n) + 0.5)
            weights = np.full(n, 1.0 / n)
        elif rule == "ends":
            if self.length_deg >= 360.0 - _TOL:
                offsets = step * np.arange(n)
                weights = np.full(n, 1.0 / n)
            else:
                offsets = step * np.arange(n + 1)
                weights = np.full(n + 1, 1.0 / n)
                weights[[0, -1]] *= 0.5
        else:
            raise ValueError(f"arc rule {rule!r} is not 'midpoint' or 'ends'")
        return (self.start_deg + sign * offsets) % 360.0, weights

    def static_beams(self, increment_deg: float, rule: str = "midpoint") -> list[Beam]:
        """The static beams (named ``<arc name> k/n``) simulating the arc; their weights are
        :meth:`static_angles`'s."""
        angles, _ = self.static_angles(increment_deg, rule)
        m = len(angles)
        return [replace(self.beam, name=f"{self.beam.name} {k + 1}/{m}", gantry_deg=float(a))
                for k, a in enumerate(angles)]


def simulate_arcs(arcs, increment_deg: float, rule: str = "midpoint") -> tuple[list[Beam], np.ndarray, np.ndarray]:
    """Static beams for several arcs at one plan-wide increment (each arc adjusting it to its
    own length): (beams, weights within their arc, index of the arc of each beam)."""
    beams, weights, owner = [], [], []
    for i, arc in enumerate(arcs):
        _, w = arc.static_angles(increment_deg, rule)
        beams += arc.static_beams(increment_deg, rule)
        weights += list(w)
        owner += [i] * len(w)
    return beams, np.asarray(weights, dtype=np.float64), np.asarray(owner, dtype=np.int64)
