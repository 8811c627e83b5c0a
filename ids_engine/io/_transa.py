"""Elekta Transa-style export of MLC field shapes (seed 001, "Output Plan", "Elekta Transa").

The seed describes the configuration file and the limits, not the bytes of Elekta's
private protocol (the "Elekta Precise Treatment System External Interfaces Manual,
TRANSA", which we do not have). What follows the seed exactly, and what is our
assumption, is said at each point.

**Configuration file** (``ElektaTransa.loc``; the seed's format, exactly): ``//`` starts a
comment line; every setting is a line ``/* name */ value``. The names are the seed's::

    /* file format version this file */ 1
    /* limit of number of plans per patient directory */ 3
    /* limit of number of beams per plan */ 8
    /* name of machine to put in the file */MLC_01
    /* number of characters of patient dept. id # to use */ 7
    /* number of characters of last name of patient to use */ 3
    /* number of characters of first name of patient to use */ 0
    /* number of characters of middle name of patient to use */ 0

Assumption: the seed says the file "specifies the directory where the beam data files are
to be written to", but its example lost that line. We read it from a line
``/* directory where plans are to be exported to */ /home/export.d/patients`` or from the
first line that is neither a comment nor a ``/* */`` setting (a relative path is taken
relative to the configuration file's folder); without one, the caller's directory is used. Names are matched without regard to case or spacing; an unknown name,
a missing setting, a version other than 1 or a value that is not a whole number is an
:class:`~ids_engine.io.InputError` naming the file, the line and the setting.
:func:`find_transa_config` looks for the file where the seed says: the machine's beam data
directory first, then the program resources directory.

**Patient ID** (seed): the first N characters of the department number, then of the last,
first and middle names, N from the configuration; at most 12 characters are used ("Only 12
characters are actually used in any case"), so that a number can be appended within the
14-character limit. Assumption: only letters and digits are kept, upper-cased. When the
fields of a plan exceed ``beams per plan`` they continue in a further plan (site); when
the plans exceed ``plans per patient directory`` they continue under a second patient ID,
the base ID with ``2`` appended (then ``3``, ...; the first ID has no number). The seed's
example: 26 fields, 8 per plan, 3 plans per ID: ID 1 holds plans of 8, 8 and 8 fields, ID
2 one plan with the last 2.

**Fields** (assumption): a step-and-shoot beam is one field per segment of non-zero MU, in
beam order (the seed's system exported one shape per beam; a linac delivers a segment as a
field shape). Only the energy, the field shape, the jaws, the collimator angle and the leaf
positions are written (seed); no MU, gantry angle or couch angle.

**Files** (assumption, the protocol's bytes being private): one directory per patient ID
under the export directory, one plain-text file ``PLAN<n>.TXT`` per plan (site) in it, of
``KEY=value`` lines; lengths in mm in the IEC 61217 beam-limiting-device frame at the
isocentre plane (leaf bank A on +X, bank B on -X, pairs numbered from -Y to +Y)::

    MACHINE=MLC_01
    PATIENT_ID=1234567SMI
    PLAN=1
    FIELDS=2
    FIELD=1
    NAME=B1 G0 S1
    ENERGY_MV=6
    COLLIMATOR_DEG=0
    JAW_X_MM=-50.0,50.0
    JAW_Y_MM=-40.0,40.0
    LEAF_PAIRS=60
    LEAF=1,-0.0,0.0            (pair, bank B position, bank A position)
    ...
    SHAPE=-50.0,-40.0;...      (the open outline, one polygon per run of open pairs)
    END_FIELD
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..deliver import DeliverablePlan
from ._errors import InputError

__all__ = ["TRANSA_CONFIG_NAME", "TransaConfig", "find_transa_config", "read_transa_config",
           "read_transa_plan", "transa_patient_id", "write_transa"]

TRANSA_CONFIG_NAME = "ElektaTransa.loc"
PATIENT_ID_LIMIT = 14
PATIENT_ID_BASE_LIMIT = 12

# Setting -> (words that identify its name, attribute).
_SETTINGS = (
    (("format", "version"), "version"),
    (("plans", "per", "patient"), "plans_per_patient"),
    (("beams", "per", "plan"), "beams_per_plan"),
    (("name", "machine"), "machine_name"),
    (("dept",), "department_chars"),
    (("last", "name"), "last_name_chars"),
    (("first", "name"), "first_name_chars"),
    (("middle", "name"), "middle_name_chars"),
    (("directory",), "directory"),
)
_REQUIRED = ("version", "plans_per_patient", "beams_per_plan", "machine_name", "department_chars",
             "last_name_chars", "first_name_chars", "middle_name_chars")
_SETTING_LINE = re.compile(r"^/\*(?P<name>.*?)\*/\s*(?P<value>.*?)\s*$")


@dataclass(frozen=True)
class TransaConfig:
    """The settings of an ``ElektaTransa.loc`` file (see the module docstring)."""

    plans_per_patient: int = 3
    beams_per_plan: int = 8
    machine_name: str = "MLC_01"
    department_chars: int = 7
    last_name_chars: int = 3
    first_name_chars: int = 0
    middle_name_chars: int = 0
    directory: str = ""
    version: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("plans_per_patient", "beams_per_plan"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransaConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("department_chars", "last_name_chars", "first_name_chars", "middle_name_chars"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TransaConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.machine_name.strip():
            raise ValueError("TransaConfig.machine_name must not be empty")


def _setting_of(name: str) -> str | None:
    words = re.findall(r"[a-z]+", name.lower())
    for keys, attr in _SETTINGS:
        if all(k in words for k in keys):
            return attr
    return None


def read_transa_config(path: "str | Path") -> TransaConfig:
    """Read an ``ElektaTransa.loc`` configuration file (format in the module docstring).

    Raises
    ------
    InputError
        Naming the file and the line: an unknown setting, a repeated one, a value that is
        not a whole number >= 0 (limits: >= 1), a version other than 1, a missing setting.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror or exc})", path) from exc
    values: dict[str, object] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().replace("\u00a0", " ")
        if not line or line.startswith("//"):
            continue
        where = f"line {n}"
        m = _SETTING_LINE.match(line)
        if not m:
            if line.startswith("/*"):
                raise InputError(f"{line!r} opens a /* name */ but does not close it", path, where)
            attr, value, label = "directory", line, "directory"
        else:
            label = " ".join(m["name"].split())
            attr = _setting_of(label)
            value = m["value"]
            if attr is None:
                raise InputError(f"unknown setting /* {label} */ (known: the seed's names, see ids_engine.io._transa)",
                                 path, where)
        if attr in values:
            raise InputError(f"{label!r} is set twice", path, where)
        if attr in ("machine_name", "directory"):
            if not value:
                raise InputError(f"/* {label} */ has no value", path, where)
            values[attr] = value
            continue
        if not re.fullmatch(r"\d+", value):
            raise InputError(f"/* {label} */ must be a whole number, got {value!r}", path, where)
        number = int(value)
        if attr == "version" and number != 1:
            raise InputError(f"file format version {number} is not supported (only 1)", path, where)
        if attr in ("plans_per_patient", "beams_per_plan") and number < 1:
            raise InputError(f"/* {label} */ must be at least 1, got {number}", path, where)
        values[attr] = number
    if values.get("directory") and not Path(str(values["directory"])).is_absolute():
        values["directory"] = str(path.parent / str(values["directory"]))
    missing = [a for a in _REQUIRED if a not in values]
    if missing:
        raise InputError(f"missing setting(s): {', '.join(missing)}", path)
    return TransaConfig(**values, source=str(path))  # type: ignore[arg-type]


def find_transa_config(machine_dir: "str | Path | None", resources_dir: "str | Path | None") -> Path | None:
    """``ElektaTransa.loc`` in the machine's beam data directory, else in the program resources
    directory (the seed's order); None when neither has it."""
    for d in (machine_dir, resources_dir):
        if d is not None and (Path(d) / TRANSA_CONFIG_NAME).is_file():
            return Path(d) / TRANSA_CONFIG_NAME
    return None


def _keep(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(text).upper())


def transa_patient_id(config: TransaConfig, *, department_number: str = "", last_name: str = "",
                      first_name: str = "", middle_name: str = "", number: int = 1) -> str:
    """The patient ID (module docstring): department, last, first and middle name characters as
    configured, letters and digits only, at most 12; ``number`` > 1 appended for overflow IDs.

    Raises
    ------
    ValueError
        The ID would be empty, or would pass 14 characters.
    """
    base = (_keep(department_number)[:config.department_chars] + _keep(last_name)[:config.last_name_chars]
            + _keep(first_name)[:config.first_name_chars] + _keep(middle_name)[:config.middle_name_chars])
    base = base[:PATIENT_ID_BASE_LIMIT]
    if not base:
        raise ValueError("the Transa patient ID is empty: give a department number or names with letters or digits "
                         "(and a configuration that uses some of their characters)")
    out = base if number <= 1 else f"{base}{number}"
    if len(out) > PATIENT_ID_LIMIT:
        raise ValueError(f"patient ID {out!r} would exceed {PATIENT_ID_LIMIT} characters ({number} overflow IDs)")
    return out


def _outline(x1: np.ndarray, x2: np.ndarray, edges: np.ndarray) -> list[list[tuple[float, float]]]:
    """Polygons (counter-clockwise, mm) around each run of consecutive open pairs."""
    polys = []
    k, n = 0, x1.size
    while k < n:
        if x2[k] <= x1[k]:
            k += 1
            continue
        start = k
        while k < n and x2[k] > x1[k]:
            k += 1
        run = range(start, k)
        right = [(float(x2[j]), float(edges[j + e])) for j in run for e in (0, 1)]
        left = [(float(x1[j]), float(edges[j + e])) for j in reversed(run) for e in (1, 0)]
        polys.append(right + left)
    return polys


def _fields(plan: DeliverablePlan) -> list[dict]:
    out = []
    for sb in plan.beams:
        segs = [s for s in sb.segments if s.mu > 0]
        for k, seg in enumerate(segs, start=1):
            out.append({"name": f"{sb.beam.name} S{k}" if len(segs) > 1 else sb.beam.name, "beam": sb.beam,
                        "mlc": sb.mlc, "aperture": seg.aperture})
    return out


def _field_lines(n: int, f: dict) -> list[str]:
    ap, mlc, beam = f["aperture"], f["mlc"], f["beam"]
    jx, jy = ap.jaw_x_mm, ap.jaw_y_mm
    # The open shape: leaves clipped to the jaws, pairs outside the Y jaws closed.
    edges = np.clip(mlc.leaf_boundaries_mm(), jy[0], jy[1])
    x1 = np.clip(ap.leaf_x1_mm, jx[0], jx[1])
    x2 = np.clip(ap.leaf_x2_mm, jx[0], jx[1])
    x2 = np.where(edges[1:] > edges[:-1], x2, x1)
    shape = ";".join(" ".join(f"{x:.1f},{y:.1f}" for x, y in poly) for poly in _outline(x1, x2, edges))
    lines = [f"FIELD={n}", f"NAME={f['name']}", f"ENERGY_MV={beam.energy_mv:g}",
             f"COLLIMATOR_DEG={beam.collimator_deg:g}", f"JAW_X_MM={jx[0]:.1f},{jx[1]:.1f}",
             f"JAW_Y_MM={jy[0]:.1f},{jy[1]:.1f}", f"LEAF_PAIRS={mlc.n_pairs}"]
    lines += [f"LEAF={k + 1},{ap.leaf_x1_mm[k]:.1f},{ap.leaf_x2_mm[k]:.1f}" for k in range(mlc.n_pairs)]
    lines += [f"SHAPE={shape}", "END_FIELD"]
    return lines


def write_transa(plan: DeliverablePlan, config: TransaConfig, *, directory: "str | Path | None" = None,
                 department_number: str = "", last_name: str = "", first_name: str = "",
                 middle_name: str = "") -> list[Path]:
    """Write a plan's field shapes in the Transa-style layout (module docstring).

    Parameters
    ----------
    plan : the deliverable plan.
    config : from :func:`read_transa_config`.
    directory : the export directory; None uses the configuration's (an error if it has none).
    department_number, last_name, first_name, middle_name : build the patient ID.

    Returns
    -------
    list of pathlib.Path
        The plan files written, in order.
    """
    target = Path(directory) if directory is not None else (Path(config.directory) if config.directory else None)
    if target is None:
        raise ValueError(f"{config.source or 'the Transa configuration'}: no export directory configured; give one")
    fields = _fields(plan)
    if not fields:
        raise ValueError("write_transa: the plan has no segment with MU")
    per_plan, per_id = config.beams_per_plan, config.plans_per_patient
    plans = [fields[i:i + per_plan] for i in range(0, len(fields), per_plan)]
    written = []
    for p, chunk in enumerate(plans):
        id_number, plan_number = p // per_id + 1, p % per_id + 1
        pid = transa_patient_id(config, department_number=department_number, last_name=last_name,
                                first_name=first_name, middle_name=middle_name, number=id_number)
        lines = ["// Elekta Transa-style field shapes written by ids-engine: research use only",
                 f"MACHINE={config.machine_name}", f"PATIENT_ID={pid}", f"PLAN={plan_number}", f"FIELDS={len(chunk)}"]
        for n, f in enumerate(chunk, start=1):
            lines += _field_lines(n, f)
        folder = target / pid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"PLAN{plan_number}.TXT"
        path.write_text("\n".join(lines) + "\n", encoding="ascii", errors="replace")
        written.append(path)
    return written


def read_transa_plan(path: "str | Path") -> dict:
    """Read back a plan file :func:`write_transa` wrote: ``{"machine", "patient_id", "plan", "n_fields",
    "fields": [{"name", "energy_mv", "collimator_deg", "jaw_x_mm", "jaw_y_mm", "leaf_x1_mm",
    "leaf_x2_mm", "shape"}]}`` (for checks and tests)."""
    path = Path(path)
    doc: dict = {"fields": []}
    field_: dict | None = None
    for n, raw in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        if not raw or raw.startswith("//"):
            continue
        key, sep, value = raw.partition("=")
        if not sep and key != "END_FIELD":
            raise InputError(f"expected KEY=value, got {raw!r}", path, f"line {n}")
        try:
            if key == "FIELD":
                field_ = {"leaves": []}
            elif key == "END_FIELD" and field_ is not None:
                leaves = np.asarray(field_.pop("leaves"), dtype=np.float64).reshape(-1, 3)
                field_["leaf_x1_mm"], field_["leaf_x2_mm"] = leaves[:, 1], leaves[:, 2]
                doc["fields"].append(field_)
                field_ = None
            elif field_ is not None:
                if key == "LEAF":
                    field_["leaves"].extend(float(v) for v in value.split(","))
                elif key in ("JAW_X_MM", "JAW_Y_MM"):
                    field_[key.lower()] = tuple(float(v) for v in value.split(","))
                elif key in ("ENERGY_MV", "COLLIMATOR_DEG"):
                    field_[key.lower()] = float(value)
                elif key == "SHAPE":
                    field_["shape"] = [[tuple(float(c) for c in pt.split(",")) for pt in poly.split()]
                                       for poly in value.split(";") if poly]
                else:
                    field_[key.lower()] = value
            else:
                doc[{"MACHINE": "machine", "PATIENT_ID": "patient_id", "FIELDS": "n_fields"}.get(key, key.lower())] = value
        except ValueError as exc:
            raise InputError(f"bad value {value!r} ({exc})", path, f"line {n}: {key}") from None
    return doc
