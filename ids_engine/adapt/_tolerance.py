"""Tolerance profiles: how far an adapted plan may differ from the approved one and still be
auto-qualified for review (claim 8 of seed 003).

Profile file format (TOML, read with :mod:`tomllib`)::

    name = "default"                 # optional
    description = "..."              # optional

    [limits.target]                  # every structure of kind target
    D95_pct_rx = 3.0                 # |delta D95| <= 3 % of the prescription
    mean_gy = 1.0                    # |delta mean| <= 1 Gy
    V95_pct = 3.0                    # |delta V95| <= 3 percentage points of the volume

    [limits.oar]                     # every structure of kind oar
    mean_pct_rx = 3.0

    [limits.structure.Rectum]        # one structure by name: replaces its kind's limit of the same metric
    max_gy = 1.5

    [gamma]                          # minimum pass rates, % (global gamma, low-dose threshold below)
    min_pass_rate_3pct_3mm = 95.0
    min_pass_rate_2pct_2mm = 90.0
    low_dose_threshold_pct = 10.0

    [registration]                   # optional
    max_fiducial_rms_mm = 2.0        # marker residual of a fiducial registration

Limit keys are ``<metric>_<unit>``: metrics ``D98 D95 D50 D2 mean max min`` (Gy doses) with
units ``gy`` or ``pct_rx`` (% of the prescription), and ``V95 V107`` with unit ``pct``
(percentage points of the structure's volume). A limit bounds the absolute difference
``|adapted - approved|``. Structures of kind ``external`` are not checked unless named in
``[limits.structure]``. Unknown keys are errors naming the file and the key, so a typo
cannot silently drop a check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ids_engine.io import InputError, read_toml

__all__ = ["DOSE_METRICS", "VOLUME_METRICS", "Limit", "ToleranceProfile", "default_tolerance", "read_tolerance"]

DOSE_METRICS = ("D98", "D95", "D50", "D2", "mean", "max", "min")
VOLUME_METRICS = ("V95", "V107")
_KEY = re.compile(r"^(D98|D95|D50|D2|mean|max|min)_(gy|pct_rx)$|^(V95|V107)_(pct)$")
_KINDS = ("target", "oar", "external", "other")


@dataclass(frozen=True)
class Limit:
    """A bound on ``|delta|`` of one metric: ``value`` in ``unit`` ('gy', 'pct_rx' or 'pct')."""

    metric: str
    unit: str
    value: float

    def delta_in_unit(self, delta: float, prescription_gy: float) -> float:
        """``delta`` (Gy for dose metrics, percentage points for V metrics) in this limit's unit."""
        if self.unit == "pct_rx":
            return 100.0 * delta / prescription_gy
        return delta

    def describe(self) -> str:
        unit = {"gy": "Gy", "pct_rx": "% of Rx", "pct": "% of the volume"}[self.unit]
        return f"|delta {self.metric}| <= {self.value:g} {unit}"


@dataclass(frozen=True)
class ToleranceProfile:
    """Limits per structure kind and per structure, minimum gamma pass rates.

    Attributes
    ----------
    kind_limits : structure kind -> metric -> :class:`Limit`.
    structure_limits : structure name -> metric -> :class:`Limit` (replaces the kind's).
    gamma_min_pass_pct : criterion ('3%/3mm', '2%/2mm') -> minimum pass rate, %.
    low_dose_threshold_pct : gamma's low-dose cutoff, % of the reference maximum.
    max_fiducial_rms_mm : marker residual limit of a fiducial registration (None: not checked).
    name, description, source : for reports (source: the file, or 'built-in').
    """

    kind_limits: dict = field(default_factory=dict)
    structure_limits: dict = field(default_factory=dict)
    gamma_min_pass_pct: dict = field(default_factory=dict)
    low_dose_threshold_pct: float = 10.0
    max_fiducial_rms_mm: float | None = None
    name: str = ""
    description: str = ""
    source: str = "built-in"

    def limits_for(self, name: str, kind: str) -> dict:
        """metric -> :class:`Limit` that applies to structure ``name`` of ``kind``."""
        out = dict(self.kind_limits.get(kind, {}))
        out.update(self.structure_limits.get(name, {}))
        return out

    def to_dict(self) -> dict:
        lim = lambda d: {m: {"unit": v.unit, "value": v.value} for m, v in d.items()}  # noqa: E731
        return {"name": self.name, "description": self.description, "source": self.source,
                "kind_limits": {k: lim(v) for k, v in self.kind_limits.items()},
                "structure_limits": {k: lim(v) for k, v in self.structure_limits.items()},
                "gamma_min_pass_pct": dict(self.gamma_min_pass_pct),
                "low_dose_threshold_pct": self.low_dose_threshold_pct,
                "max_fiducial_rms_mm": self.max_fiducial_rms_mm}


def _number(value, path, key: str, *, lo: float = 0.0, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"must be a finite number, got {value!r}", path, key)
    v = float(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise InputError(f"must be {rng}, got {value!r}", path, key)
    return v


def _limits(table, path, where: str) -> dict:
    if not isinstance(table, dict):
        raise InputError(f"must be a table of limits such as D95_pct_rx = 3.0, got {table!r}", path, where)
    out = {}
    for key, value in table.items():
        m = _KEY.match(key)
        if not m:
            raise InputError(f"unknown limit {key!r}; expected <metric>_<unit> with metric one of "
                             f"{', '.join(DOSE_METRICS)} and unit gy or pct_rx, or V95_pct / V107_pct",
                             path, f"{where}.{key}")
        metric = m.group(1) or m.group(3)
        unit = m.group(2) or m.group(4)
        if metric in out:
            raise InputError(f"two limits on {metric} ({out[metric].unit} and {unit}); keep one", path,
                             f"{where}.{key}")
        out[metric] = Limit(metric, unit, _number(value, path, f"{where}.{key}"))
    return out


def read_tolerance(path: "str | Path") -> ToleranceProfile:
    """Read a tolerance profile (TOML; format in this module's docstring).

    Raises
    ------
    InputError naming the file and the key: not TOML, an unknown section or key, a limit
    that is not a non-negative number, a pass rate outside 0-100 %.
    """
    path = Path(path)
    data = read_toml(path)
    unknown = sorted(set(data) - {"name", "description", "limits", "gamma", "registration"})
    if unknown:
        raise InputError(f"unknown key(s) {unknown}; expected name, description, [limits.*], [gamma], [registration]",
                         path, unknown[0])
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise InputError(f"must be a string, got {data[key]!r}", path, key)
    limits = data.get("limits", {})
    if not isinstance(limits, dict):
        raise InputError("must be a table ([limits.target], [limits.oar], [limits.structure.NAME])", path, "limits")
    kind_limits, structure_limits = {}, {}
    for key, table in limits.items():
        if key == "structure":
            if not isinstance(table, dict):
                raise InputError("must hold one table per structure ([limits.structure.NAME])", path, "limits.structure")
            for name, sub in table.items():
                structure_limits[name] = _limits(sub, path, f"limits.structure.{name}")
        elif key in _KINDS:
            kind_limits[key] = _limits(table, path, f"limits.{key}")
        else:
            raise InputError(f"unknown structure kind {key!r}; expected {', '.join(_KINDS)} or structure",
                             path, f"limits.{key}")
    gamma = data.get("gamma", {})
    if not isinstance(gamma, dict):
        raise InputError("must be a table", path, "gamma")
    rates, low = {}, 10.0
    for key, value in gamma.items():
        if key == "min_pass_rate_3pct_3mm":
            rates["3%/3mm"] = _number(value, path, f"gamma.{key}", hi=100.0)
        elif key == "min_pass_rate_2pct_2mm":
            rates["2%/2mm"] = _number(value, path, f"gamma.{key}", hi=100.0)
        elif key == "low_dose_threshold_pct":
            low = _number(value, path, f"gamma.{key}", hi=100.0)
        else:
            raise InputError(f"unknown key {key!r}; expected min_pass_rate_3pct_3mm, min_pass_rate_2pct_2mm, "
                             "low_dose_threshold_pct", path, f"gamma.{key}")
    reg = data.get("registration", {})
    if not isinstance(reg, dict):
        raise InputError("must be a table", path, "registration")
    rms = None
    for key, value in reg.items():
        if key != "max_fiducial_rms_mm":
            raise InputError(f"unknown key {key!r}; expected max_fiducial_rms_mm", path, f"registration.{key}")
        rms = _number(value, path, f"registration.{key}")
    if not kind_limits and not structure_limits and not rates:
        raise InputError("the profile has no limits and no gamma pass rates: nothing to qualify against", path, "limits")
    return ToleranceProfile(kind_limits, structure_limits, rates, low, rms, data.get("name", ""),
                            data.get("description", ""), str(path))


def default_tolerance() -> ToleranceProfile:
    """The built-in profile (the same as ``examples/adapt/tolerance_default.toml``)."""
    L = Limit
    return ToleranceProfile(
        kind_limits={
            "target": {"D98": L("D98", "pct_rx", 3.0), "D95": L("D95", "pct_rx", 3.0), "D50": L("D50", "pct_rx", 2.0),
                       "D2": L("D2", "pct_rx", 3.0), "mean": L("mean", "pct_rx", 2.0), "V95": L("V95", "pct", 3.0)},
            "oar": {"mean": L("mean", "pct_rx", 3.0), "D2": L("D2", "pct_rx", 5.0), "max": L("max", "pct_rx", 5.0)},
        },
        gamma_min_pass_pct={"3%/3mm": 95.0, "2%/2mm": 90.0},
        low_dose_threshold_pct=10.0, max_fiducial_rms_mm=2.0, name="default",
        description="built-in default: targets within 2-3 % of Rx, OARs within 3-5 % of Rx, gamma 95 % (3%/3mm) "
                    "and 90 % (2%/2mm)")
