"""Protocols: the goals of a plan, read from a TOML file or converted from matRad ``cst``.

Protocol file format (TOML, read with :mod:`tomllib`)::

    # Optional header.
    name = "TG-119 C-shape, harder goals"
    description = "AAPM TG-119 (2009), table 3"

    # One [[goal]] table per goal.
    [[goal]]
    structure = "PTV"          # required: the structure's name
    kind = "min_dvh"           # required unless `dvh` is given; one of the kinds below
    dose_gy = 50               # the kind's parameters (below)
    volume_pct = 95
    constraint = true          # optional, default false (an objective)
    importance = 100           # optional, default 1 (objectives' weight, > 0)
    name = "PTV coverage"      # optional label for reports

    [[goal]]
    structure = "Core"
    dvh = "D10 <= 10 Gy"       # a DVH point as a planner writes it, instead of kind + parameters
    importance = 50

Kinds and their parameters (doses in Gy, volumes in % of the structure):

===============  ====================  ==================================================
kind             parameters            meaning
===============  ====================  ==================================================
min_dose         dose_gy               every voxel >= dose (objective: squared underdose)
max_dose         dose_gy               every voxel <= dose (objective: squared overdose)
uniform_dose     dose_gy               squared deviation from dose (objective only)
min_mean_dose    dose_gy               mean >= dose
max_mean_dose    dose_gy               mean <= dose
min_eud          eud_gy, a             generalised EUD >= eud_gy (targets, a < 1)
max_eud          eud_gy, a             generalised EUD <= eud_gy (organs, a >= 1)
min_dvh          dose_gy, volume_pct   at least volume_pct receives dose_gy (D95 >= 50 Gy)
max_dvh          dose_gy, volume_pct   at most volume_pct above dose_gy (V20Gy <= 30 %)
===============  ====================  ==================================================

``dvh`` strings: ``"Dv <= x Gy"``, ``"Dv >= x Gy"`` (v in % of the volume, an optional
``%`` after it), ``"VxGy <= v %"``, ``"VxGy >= v %"``. Unknown keys are errors, so a typo
cannot silently drop a parameter. Every error is an :class:`~ids_engine.io.InputError`
naming the file, the entry (``goal 3 (PTV, min_dvh)``) and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ids_engine.io import InputError, read_toml

from ._goals import GOAL_KINDS, Goal, MaxDose, MaxDVH, MaxEUD, MaxMeanDose, MinDose, MinDVH, MinEUD, MinMeanDose, UniformDose

__all__ = ["Protocol", "dvh_goal", "goals_from_matrad", "protocol_from_matrad", "read_protocol"]

# Parameters each kind takes, in the order its dataclass takes them.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "min_dose": ("dose_gy",),
    "max_dose": ("dose_gy",),
    "uniform_dose": ("dose_gy",),
    "min_mean_dose": ("dose_gy",),
    "max_mean_dose": ("dose_gy",),
    "min_eud": ("eud_gy", "a"),
    "max_eud": ("eud_gy", "a"),
    "min_dvh": ("dose_gy", "volume_pct"),
    "max_dvh": ("dose_gy", "volume_pct"),
}
_COMMON = ("structure", "kind", "dvh", "constraint", "importance", "name")


@dataclass(frozen=True)
class Protocol:
    """A plan's goals.

    Attributes
    ----------
    goals : the goals, in file order.
    name : the protocol's name ('' if none).
    description : free text ('' if none).
    notes : what a conversion left out or changed (e.g. matRad entries it could not map).
    """

    goals: tuple[Goal, ...]
    name: str = ""
    description: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        goals = tuple(self.goals)
        for i, g in enumerate(goals):
            if not isinstance(g, Goal):
                raise ValueError(f"Protocol.goals[{i}] must be a Goal, got {type(g).__name__}")
        object.__setattr__(self, "goals", goals)
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def structures(self) -> tuple[str, ...]:
        """Names of the structures the goals are about, in order of first mention."""
        return tuple(dict.fromkeys(g.structure for g in self.goals))

    @property
    def objectives(self) -> tuple[Goal, ...]:
        return tuple(g for g in self.goals if not g.constraint)

    @property
    def constraints(self) -> tuple[Goal, ...]:
        return tuple(g for g in self.goals if g.constraint)


# ------------------------------------------------------------------ DVH strings
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_D_FORM = re.compile(rf"^D\s*{_NUM}\s*%?\s*(<=|>=)\s*{_NUM}\s*Gy$", re.IGNORECASE)
_V_FORM = re.compile(rf"^V\s*{_NUM}\s*Gy\s*(<=|>=)\s*{_NUM}\s*%$", re.IGNORECASE)


def dvh_goal(structure: str, text: str, **options: Any) -> Goal:
    """A DVH goal from a planner's notation.

    Parameters
    ----------
    structure : the structure's name.
    text : ``"D95 >= 50 Gy"`` (95 % of the volume receives at least 50 Gy),
        ``"D10% <= 55 Gy"``, ``"V20Gy <= 30 %"`` or ``"V50Gy >= 95 %"``.
    **options : ``importance``, ``constraint``, ``name``, passed on.

    Returns
    -------
    :class:`~._goals.MinDVH` for ``>=``, :class:`~._goals.MaxDVH` for ``<=``.
    """
    s = " ".join(str(text).split())
    m = _D_FORM.match(s)
    if m:
        volume_pct, op, dose = float(m.group(1)), m.group(2), float(m.group(3))
    else:
        m = _V_FORM.match(s)
        if not m:
            raise ValueError(f"dvh: {text!r} is not a DVH point such as 'D95 >= 50 Gy' or 'V20Gy <= 30 %'")
        dose, op, volume_pct = float(m.group(1)), m.group(2), float(m.group(3))
    cls = MinDVH if op == ">=" else MaxDVH
    return cls(structure, dose, volume_pct, **options)


# ------------------------------------------------------------------ TOML files
def read_protocol(path: "str | Path") -> Protocol:
    """Read a protocol file (TOML; the format is in this module's docstring).

    Parameters
    ----------
    path : the .toml file.

    Returns
    -------
    :class:`Protocol`.

    Raises
    ------
    InputError naming the file, the entry (``goal 2 (Core, max_dvh)``) and the field: not
    TOML, no goals, an unknown kind or key, a missing or bad parameter.
    """
    path = Path(path)
    data = read_toml(path)
    unknown = sorted(set(data) - {"name", "description", "goal"})
    if unknown:
        raise InputError(f"unknown top-level key(s) {unknown}; expected name, description and [[goal]] tables",
                         path, unknown[0])
    header = {}
    for key in ("name", "description"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise InputError(f"must be a string, got {value!r}", path, key)
        header[key] = value
    entries = data.get("goal")
    if entries is None:
        raise InputError("no goals: add [[goal]] tables", path, "goal")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError("must be an array of tables ([[goal]])", path, "goal")
    goals = tuple(_goal_from_entry(e, i + 1, path) for i, e in enumerate(entries))
    if not goals:
        raise InputError("no goals: add [[goal]] tables", path, "goal")
    return Protocol(goals, name=header["name"], description=header["description"])


def _goal_from_entry(entry: dict, number: int, path: Path) -> Goal:
    structure = entry.get("structure")
    kind = entry.get("kind")
    where = f"goal {number} ({structure if isinstance(structure, str) else '?'}, {kind or entry.get('dvh') or '?'})"

    def fail(message: str, key: str) -> InputError:
        return InputError(message, path, f"{where}: {key}")

    if not isinstance(structure, str) or not structure.strip():
        raise fail("required: the structure's name (a non-empty string)", "structure")
    options: dict[str, Any] = {}
    for key, expect in (("constraint", bool), ("importance", (int, float)), ("name", str)):
        if key in entry:
            value = entry[key]
            if not isinstance(value, expect) or (key == "importance" and isinstance(value, bool)):
                raise fail(f"must be {'true or false' if expect is bool else 'a number' if key == 'importance' else 'a string'}, "
                           f"got {value!r}", key)
            options[key] = value
    if "importance" in options and not (math.isfinite(options["importance"]) and options["importance"] > 0):
        raise fail(f"must be a positive number, got {options['importance']!r}", "importance")

    if "dvh" in entry:
        if kind is not None:
            raise fail("give either kind (with its parameters) or dvh, not both", "dvh")
        extra = sorted(set(entry) - set(_COMMON))
        if extra:
            raise fail(f"unknown key for a dvh goal (allowed: {', '.join(_COMMON)})", extra[0])
        if not isinstance(entry["dvh"], str):
            raise fail(f"must be a string such as 'D95 >= 50 Gy', got {entry['dvh']!r}", "dvh")
        try:
            return dvh_goal(structure, entry["dvh"], **options)
        except ValueError as exc:
            raise fail(_strip_owner(str(exc)), _field_of(exc, "dvh")) from None

    if kind is None:
        raise fail(f"required (one of {', '.join(GOAL_KINDS)}), or give dvh", "kind")
    if kind not in GOAL_KINDS:
        raise fail(f"unknown kind {kind!r}; one of {', '.join(GOAL_KINDS)}", "kind")
    params = _PARAMETERS[kind]
    extra = sorted(set(entry) - set(_COMMON) - set(params))
    if extra:
        raise fail(f"unknown key for kind {kind!r} (its parameters: {', '.join(params)})", extra[0])
    values = []
    for p in params:
        if p not in entry:
            raise fail(f"required for kind {kind!r}", p)
        v = entry[p]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise fail(f"must be a number, got {v!r}", p)
        values.append(v)
    try:
        return GOAL_KINDS[kind](structure, *values, **options)
    except ValueError as exc:
        raise fail(_strip_owner(str(exc)), _field_of(exc, "kind")) from None


def _field_of(exc: ValueError, default: str) -> str:
    # Goal validation says "<Class>.<field> ..."; pick the field out of it.
    m = re.match(r"^\w+\.(\w+)", str(exc))
    return m.group(1) if m else default


def _strip_owner(message: str) -> str:
    return re.sub(r"^\w+\.\w+:?\s*", "", message) or message


# ---------------------------------------------------------------------- matRad
def _matrad_name(cls: str) -> str:
    """``DoseObjectives.matRad_SquaredDeviation`` -> ``squareddeviation``; old type strings lower-cased."""
    name = cls.rsplit(".", 1)[-1]
    if name.startswith("matRad_"):
        name = name[len("matRad_"):]
    return " ".join(name.lower().split())


def _numbers(params: list) -> list[float]:
    out: list[float] = []
    for p in params:
        if isinstance(p, (list, tuple)):
            out.extend(_numbers(list(p)))
        elif isinstance(p, (int, float)) and not isinstance(p, bool):
            out.append(float(p))
        elif hasattr(p, "ravel") and getattr(p, "dtype", None) is not None and p.dtype.kind in "iuf":
            out.extend(float(x) for x in p.ravel())
    return out


def goals_from_matrad(structure: str, entries: Iterable[Mapping[str, Any]]) -> tuple[Goal, ...]:
    """Goals from one structure's matRad objectives and constraints (``cst{i,6}``).

    Parameters
    ----------
    structure : the structure's name.
    entries : the entries as the matRad reader keeps them
        (``structure.meta["matrad_objectives"]``): ``{"class", "parameters", "penalty"}``.

    Returns
    -------
    The goals, in order. matRad's penalty becomes the importance (both multiply a
    voxel-averaged squared term, so they are interchangeable). Mapping:

    * SquaredDeviation(d) -> :class:`UniformDose`; SquaredOverdosing(d) -> :class:`MaxDose`;
      SquaredUnderdosing(d) -> :class:`MinDose`;
    * MeanDose(d_ref) -> :class:`MaxMeanDose` (matRad penalises the mean linearly or its
      deviation from d_ref; here the excess over d_ref, squared);
    * EUD(eud, k) -> :class:`MaxEUD` for k >= 1, :class:`MinEUD` for k < 1 (matRad's
      squared deviation is one-sided here);
    * MinDVH(d, V%) -> :class:`MinDVH`; MaxDVH(d, V%) -> :class:`MaxDVH`;
    * constraints MinMaxDose(min, max), MinMaxMeanDose(min, max), MinMaxEUD(k, min, max),
      MinMaxDVH(d, Vmin%, Vmax%) -> the min and/or max constraints they bound (a bound of
      0 below, or infinity / 100 % above, is no bound);
    * matRad before 2019: the type strings ('square overdosing', 'min DVH', 'max dose
      constraint', ...) map the same way.

    Raises
    ------
    ValueError naming the structure, the entry and the class it cannot map (classes stored
    opaquely by MATLAB carry no parameters and are refused too).
    """
    goals: list[Goal] = []
    for i, e in enumerate(entries):
        goals.extend(_from_matrad_entry(structure, i + 1, e))
    return tuple(goals)


def _from_matrad_entry(structure: str, number: int, e: Mapping[str, Any]) -> list[Goal]:
    goals: list[Goal] = []
    cls = str(e.get("class", ""))
    where = f"cst {structure!r} objective {number} ({cls or 'no class'})"
    if e.get("decoded") is False:
        raise ValueError(f"{where}: stored as a MATLAB object without its parameters; save the cst "
                         f"with struct objectives (matRad_DoseOptimizationFunction.convertOldOptimizationStruct)")
    p = _numbers(list(e.get("parameters", [])))
    penalty = e.get("penalty")
    importance = float(penalty) if isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and penalty > 0 else 1.0
    obj = {"importance": importance}
    con = {"constraint": True}
    name = _matrad_name(cls)

    def need(n: int) -> None:
        if len(p) < n:
            raise ValueError(f"{where}: needs {n} numeric parameter(s), got {p}")

    try:
        if name in ("squareddeviation", "square deviation"):
            need(1)
            goals.append(UniformDose(structure, p[0], **obj))
        elif name in ("squaredoverdosing", "square overdosing"):
            need(1)
            goals.append(MaxDose(structure, p[0], **obj))
        elif name in ("squaredunderdosing", "square underdosing"):
            need(1)
            goals.append(MinDose(structure, p[0], **obj))
        elif name in ("meandose", "mean"):
            goals.append(MaxMeanDose(structure, p[0] if p else 0.0, **obj))
        elif name == "eud":
            need(2)
            goals.append((MaxEUD if p[1] >= 1 else MinEUD)(structure, p[0], p[1], **obj))
        elif name in ("mindvh", "min dvh"):
            need(2)
            goals.append(MinDVH(structure, p[0], p[-1], **obj))
        elif name in ("maxdvh", "max dvh"):
            need(2)
            goals.append(MaxDVH(structure, p[0], p[-1], **obj))
        elif name == "minmaxdose" or name == "min max dose constraint":
            need(2)
            if p[0] > 0:
                goals.append(MinDose(structure, p[0], **con))
            if math.isfinite(p[1]):
                goals.append(MaxDose(structure, p[1], **con))
        elif name == "max dose constraint":
            need(1)
            goals.append(MaxDose(structure, p[0], **con))
        elif name == "min dose constraint":
            need(1)
            goals.append(MinDose(structure, p[0], **con))
        elif name in ("minmaxmeandose", "min max mean dose constraint"):
            need(2)
            if p[0] > 0:
                goals.append(MinMeanDose(structure, p[0], **con))
            if math.isfinite(p[1]):
                goals.append(MaxMeanDose(structure, p[1], **con))
        elif name == "max mean dose constraint":
            need(1)
            goals.append(MaxMeanDose(structure, p[0], **con))
        elif name == "min mean dose constraint":
            need(1)
            goals.append(MinMeanDose(structure, p[0], **con))
        elif name == "minmaxeud":
            need(3)
            k, lo, hi = p[0], p[1], p[2]
            if lo > 0:
                goals.append(MinEUD(structure, lo, k, **con))
            if math.isfinite(hi):
                goals.append(MaxEUD(structure, hi, k, **con))
        elif name in ("max eud constraint", "min eud constraint"):
            need(2)
            goals.append((MaxEUD if name.startswith("max") else MinEUD)(structure, p[0], p[1], **con))
        elif name == "minmaxdvh":
            need(3)
            d, vmin, vmax = p[0], p[1], p[2]
            if vmin > 0:
                goals.append(MinDVH(structure, d, vmin, **con))
            if vmax < 100:
                goals.append(MaxDVH(structure, d, vmax, **con))
        elif name in ("max dvh constraint", "min dvh constraint"):
            need(2)
            goals.append((MaxDVH if name.startswith("max") else MinDVH)(structure, p[0], p[-1], **con))
        else:
            raise ValueError(f"{where}: no goal for matRad class {cls!r}")
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {exc}") from None
    return goals


def protocol_from_matrad(structures: "Iterable[Any] | Mapping[str, Iterable[Mapping[str, Any]]]", *,
                         skip_unknown: bool = False, name: str = "") -> Protocol:
    """A :class:`Protocol` from matRad objectives of several structures.

    Parameters
    ----------
    structures : structures read by :func:`~ids_engine.io.read_matrad_phantom` (their
        ``meta["matrad_objectives"]``), or a mapping from structure name to entries.
    skip_unknown : leave out entries that cannot be mapped and say so in ``notes``
        (default: raise).
    name : the protocol's name.
    """
    if isinstance(structures, Mapping):
        items = list(structures.items())
    else:
        items = [(s.name, s.meta.get("matrad_objectives", [])) for s in structures]
    goals: list[Goal] = []
    notes: list[str] = []
    for sname, entries in items:
        for i, e in enumerate(entries):
            try:
                goals.extend(_from_matrad_entry(sname, i + 1, e))
            except ValueError as exc:
                if not skip_unknown:
                    raise
                notes.append(f"left out: {exc}")
    return Protocol(tuple(goals), name=name, description="converted from matRad cst", notes=tuple(notes))
