"""DVHs of several plans together (seed 001, "Dose Volume Histogram Popup").

"The dose volume histogram for the same structure for different plans may be displayed
together at the same time ... Each volume will be displayed in its chosen display color. The
line style will change each time the same volume is reselected for a different plan." The
seed also lets the planner switch between cubic centimetres and percent of volume.

:func:`plan_dvh_curves` computes the curves of every (plan, structure) pair, exactly (every
voxel, partial volumes at the edges: :func:`~ids_engine.evaluation.exact_dvh`) or by random
sampling to a density (:func:`~ids_engine.evaluation.sample_dvhs`, Niemierko and Goitein
1990); :func:`plot_dvhs` draws them in one PNG (colour per structure, line style per plan).
All arrays are host NumPy, (z, y, x) on the CT grid, doses in Gy.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from ._dvh_sampling import DVHCurve, _structures, exact_dvh, plot_dvhs, sample_dvhs

__all__ = ["DVH_METHODS", "plan_dvh_curves", "plans_dvh_png"]

DVH_METHODS = ("exact", "sampled")

# Colours for structures given as (name, mask) pairs (Structure objects bring their own).
_PALETTE = ((0.90, 0.10, 0.10), (0.10, 0.45, 0.90), (0.10, 0.65, 0.20), (0.85, 0.55, 0.00),
            (0.55, 0.20, 0.75), (0.00, 0.65, 0.65), (0.45, 0.45, 0.45))


def _plans(doses) -> list[tuple[str, np.ndarray]]:
    items = list(doses.items()) if isinstance(doses, Mapping) else [tuple(d) for d in doses]
    if not items:
        raise ValueError("plan_dvh_curves: no plans given")
    names = [str(n) for n, _ in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"plan_dvh_curves: plans named twice: {dupes}")
    return [(str(n), d) for n, d in items]


def plan_dvh_curves(doses, structures, grid, *, method: str = "exact", supersample: int = 4,
                    bin_gy: float = 0.1, density_per_mm3: float = 1.0, seed: int = 0,
                    cancel: Callable[[], bool] | None = None) -> list[DVHCurve]:
    """The DVH of every structure for every plan, as plot curves.

    Parameters
    ----------
    doses : ``{plan label: dose}`` or ``[(plan label, dose), ...]``, each dose a float
        (z, y, x) Gy array on ``grid``; the order is the plans' order in the plot (line styles).
    structures : :class:`ids_engine.model.Structure` objects (their colours are used) or
        ``(name, mask)`` pairs (a fixed palette), masks bool (z, y, x) on ``grid``.
    grid : :class:`ids_engine.model.Grid`.
    method : "exact" (every voxel, ``supersample``^3 sub-points per voxel) or "sampled"
        (random points to ``density_per_mm3``, seeded; ``cancel()`` stops it, the last
        round's curves standing).

    Returns
    -------
    One :class:`DVHCurve` per (plan, structure), plans in order, each curve's ``plan`` the
    plan's label and its ``colour`` the structure's.
    """
    if method not in DVH_METHODS:
        raise ValueError(f"DVH method must be one of {DVH_METHODS}, got {method!r}")
    plans = _plans(doses)
    named = _structures(structures)
    colours = []
    for k, s in enumerate(structures):
        c = getattr(s, "colour", None)
        colours.append(tuple(float(v) for v in c) if c is not None else _PALETTE[k % len(_PALETTE)])
    curves: list[DVHCurve] = []
    for plan, dose in plans:
        if method == "exact":
            for (name, mask), colour in zip(named, colours):
                curves.append(DVHCurve(plan, exact_dvh(name, dose, mask, grid, supersample=supersample, bin_gy=bin_gy),
                                       colour))
            continue
        last = None
        for state in sample_dvhs(dose, named, grid, density_per_mm3=density_per_mm3, seed=seed, bin_gy=bin_gy,
                                 cancel=cancel):
            last = state
        if last is None:
            raise RuntimeError(f"DVH sampling of plan {plan!r} was stopped before its first round")
        curves += [DVHCurve(plan, h, colour) for h, colour in zip(last.dvhs, colours)]
    return curves


def plans_dvh_png(path, curves: Sequence[DVHCurve], *, volume: str = "%", title: str = "",
                  prescription_gy: float | None = None):
    """The curves of :func:`plan_dvh_curves` in one PNG: colour per structure, line style per
    plan (solid, dashed, dotted, dash-dot in the order the plans come), volume in "%" or
    "cc", each curve labelled "structure (plan)". Returns the path."""
    return plot_dvhs(path, curves, volume=volume, title=title, prescription_gy=prescription_gy)
