"""matRad phantoms and photon machines (MATLAB .mat files, version 5 or 7.3).

matRad (e0404/matRad) and its Python port pyRadPlan keep a patient as two MATLAB
variables, ``ct`` (a struct) and ``cst`` (a cell array with one row per structure), and a
photon beam model as one struct, ``machine``. This module is the only place in ids-engine
that knows their field names; everything it returns speaks ids-engine's vocabulary
(:class:`~ids_engine.model.Patient`, :class:`~ids_engine.model.Structure`,
:class:`~ids_engine.model.PhotonMachine`).

Geometry. matRad stores cubes in MATLAB order ``[y x z]`` (rows, columns, slices) and
voxel lists as 1-based column-major linear indices into that cube; its world frame is
DICOM's LPS patient frame (``ct.x``, ``ct.y``, ``ct.z`` hold voxel-centre coordinates in
mm). ids-engine stores volumes ``(z, y, x)`` in the same frame, so MATLAB subscript
``(j+1, i+1, k+1)`` becomes our index ``[k, j, i]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model import (
    DEFAULT_DENSITY_CURVE,
    PATIENT_POSITIONS,
    DensityCurve,
    Grid,
    Patient,
    Structure,
    StructureKind,
    default_colour,
)
from ._errors import InputError
from ._matrad_mat import Cell, MatFileError, Opaque, load_mat_variables

__all__ = ["read_matrad_machine", "read_matrad_phantom"]

# Structures with one of these names (case-insensitive) are the external contour unless
# matRad calls them a target; matRad itself only knows the types OAR and TARGET.
_EXTERNAL_NAMES = frozenset({"body", "skin", "external", "outline", "patient", "body contour"})

# matRad's photon engine convolves fluence and kernels on a 0.5 mm grid by default
# (intConvResolution); version-1 machine files store kernels per such pixel.
_MATRAD_CONVOLUTION_MM = 0.5


# ------------------------------------------------------------------ helpers
def _load(path: "str | Path", names: tuple[str, ...]) -> tuple[Path, dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        variables, notes, flavour = load_mat_variables(path, names)
    except MatFileError as exc:
        raise InputError(str(exc), path) from None
    info = {"file_format": flavour}
    if notes:
        info["reader_warnings"] = notes
    return path, variables, info


def _is_empty(v) -> bool:
    if v is None:
        return True
    if isinstance(v, (np.ndarray, Cell)):
        return v.size == 0
    if isinstance(v, (str, list, dict)):
        return len(v) == 0
    return False


def _numeric(v, path: Path, field: str) -> np.ndarray:
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
        raise InputError(f"expected a numeric array, found {_describe(v)}", path, field)
    return v


def _scalar(v, path: Path, field: str) -> float:
    if v is None:
        raise InputError("missing", path, field)
    arr = _numeric(v, path, field)
    if arr.size != 1:
        raise InputError(f"expected one number, found an array of shape {arr.shape}", path, field)
    value = float(arr.ravel()[0])
    if not np.isfinite(value):
        raise InputError(f"must be finite, got {value}", path, field)
    return value


def _vector(v, path: Path, field: str) -> np.ndarray:
    if v is None:
        raise InputError("missing", path, field)
    arr = _numeric(v, path, field)
    if sum(n > 1 for n in arr.shape) > 1:
        raise InputError(f"expected a vector, found an array of shape {arr.shape}", path, field)
    return arr.astype(np.float64).ravel()


def _text(v, path: Path, field: str) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        raise InputError("missing", path, field)
    raise InputError(f"expected text, found {_describe(v)}", path, field)


def _describe(v) -> str:
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    if isinstance(v, Cell):
        return f"a cell array of shape {v.shape}"
    if isinstance(v, dict):
        return "a struct"
    if isinstance(v, list):
        return f"a struct array of {len(v)} elements"
    if isinstance(v, Opaque):
        return f"a MATLAB {v.matlab_class} object"
    return type(v).__name__


def _first_scenario(v) -> tuple[object, int]:
    """matRad keeps one entry per CT scenario in a cell; the first one and the count."""
    if isinstance(v, Cell):
        items = v.column_major()
        return (items[0] if items else None), len(items)
    return v, 1


def _plain(v):
    """A MATLAB value as plain Python (dict, list, str, int, float, bool)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, Cell):
        items = v.items
        if items.ndim == 2 and min(items.shape) > 1:
            return [[_plain(x) for x in row] for row in items]
        return [_plain(x) for x in v.column_major()]
    if isinstance(v, Opaque):
        return {"matlab_class": v.matlab_class}
    if isinstance(v, np.ndarray):
        if v.size == 1:
            return v.ravel()[0].item()
        if v.ndim <= 1 or sum(n > 1 for n in v.shape) <= 1:
            return v.ravel(order="F").tolist()
        return v.tolist()
    return v


def _plain_list(v) -> list:
    p = _plain(v)
    if p is None or (isinstance(p, (list, dict)) and not p):
        return []
    return p if isinstance(p, list) else [p]


# ------------------------------------------------------------------ phantom
def read_matrad_phantom(path: "str | Path") -> Patient:
    """Read a matRad phantom (``ct`` and ``cst`` variables) from a .mat file.

    Both MATLAB v5 (``scipy.io.loadmat``) and v7.3 (HDF5) files are read.

    CT. The HU cube is ``ct.cubeHU`` (first scenario when it is a cell). When a file has
    only ``ct.cube`` (relative electron density), HU are recovered by inverting the density
    curve (``ct.hlut`` when present, else :data:`~ids_engine.model.DEFAULT_DENSITY_CURVE`);
    ``patient.meta["ct_hu_from"]`` says so. A valid ``ct.hlut`` (HU, relative electron
    density) also becomes the patient's density curve, so densities match matRad's.

    Grid. Spacing from ``ct.resolution``. The origin (centre of the first voxel) is
    ``(ct.x[0], ct.y[0], ct.z[0])`` when those axes are present; otherwise it follows
    matRad's own rule (``matRad_getWorldAxes``): ``ct.dicomInfo.ImagePositionPatient``
    if present, else ``-n * d / 2`` along each axis (the cube centred on the origin to
    within half a voxel). ``patient.meta["origin_from"]`` records which.

    Structures. One per row of ``cst``: name (column 2); type (column 3: TARGET gives a
    target; otherwise a name such as BODY, Skin or External gives the external contour,
    anything else an organ at risk); voxels (column 4, first scenario). Column 5
    (properties such as overlap priority) is kept as plain Python in
    ``structure.meta["matrad_properties"]`` and column 6 (objectives and constraints) in
    ``structure.meta["matrad_objectives"]``, a list of
    ``{"class": str, "parameters": list, "penalty": float | None}`` (other fields under
    ``"extra"``; class objects that MATLAB stored opaquely get ``"decoded": False``).
    Colours come from :func:`~ids_engine.model.default_colour` (matRad's own colour stays
    in the properties).

    Parameters
    ----------
    path : the .mat file.

    Returns
    -------
    Patient with ``ct_hu`` float32 ``(z, y, x)`` in HU on a grid in DICOM patient
    coordinates (mm).

    Raises
    ------
    InputError naming the file and the field: not a .mat file, ``ct`` or ``cst`` missing,
    no ``ct.cubeHU`` nor ``ct.cube``, a cube that disagrees with ``ct.cubeDim``, bad
    resolution or axes, voxel indices outside the cube or an empty structure (named).
    """
    path, variables, info = _load(path, ("ct", "cst"))
    ct = variables.get("ct")
    if ct is None:
        raise InputError("no variable 'ct' (the CT struct) in the file", path, "ct")
    if not isinstance(ct, dict):
        raise InputError(f"expected a struct, found {_describe(ct)}", path, "ct")
    cst = variables.get("cst")
    if cst is None:
        raise InputError("no variable 'cst' (the structure set) in the file", path, "cst")
    if not isinstance(cst, Cell):
        raise InputError(f"expected a cell array, found {_describe(cst)}", path, "cst")

    cube_yxz, ct_info, density_curve = _ct_cube_hu(ct, path)
    grid, grid_info = _ct_grid(ct, cube_yxz.shape, path)
    ct_hu = np.transpose(cube_yxz, (2, 0, 1))  # MATLAB [y x z] -> (z, y, x)
    structures = _structures(cst, grid, cube_yxz.shape, path)

    position, position_from, frame_uid = "HFS", "default (HFS)", ""
    dicom_info = ct.get("dicomInfo")
    if isinstance(dicom_info, dict) and isinstance(dicom_info.get("PatientPosition"), str):
        pos = dicom_info["PatientPosition"].strip().upper()
        if pos in PATIENT_POSITIONS:
            position, position_from = pos, "ct.dicomInfo.PatientPosition"
    dicom_meta = ct.get("dicomMeta")
    if isinstance(dicom_meta, dict) and isinstance(dicom_meta.get("FrameOfReferenceUID"), str):
        frame_uid = dicom_meta["FrameOfReferenceUID"].strip()

    meta = {"source": f"matRad phantom file {path.name}", **info, **ct_info, **grid_info,
            "patient_position_from": position_from}
    try:
        return Patient(grid=grid, ct_hu=ct_hu, structures=tuple(structures), density_curve=density_curve,
                       name=path.stem, patient_position=position, frame_of_reference_uid=frame_uid, meta=meta)
    except ValueError as exc:
        raise InputError(str(exc), path, "cst") from None


def _hlut_curve(ct: dict, path: Path) -> tuple[DensityCurve | None, str]:
    hlut = ct.get("hlut")
    if _is_empty(hlut):
        return None, ""
    arr = _numeric(hlut, path, "ct.hlut")
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise InputError(f"expected an N x 2 table (HU, relative electron density), found shape {arr.shape}",
                         path, "ct.hlut")
    try:
        return DensityCurve(tuple(arr[:, 0]), tuple(arr[:, 1]), name=f"matRad ct.hlut ({path.name})"), ""
    except ValueError as exc:
        return None, f"ct.hlut not used ({exc})"


def _invert_density(curve: DensityCurve, density: np.ndarray) -> np.ndarray:
    """HU from relative electron density: the inverse of the piecewise-linear curve.

    Flat stretches of the curve (one density for a range of HU) map back to their lowest
    HU; beyond the table the end segments are extended, as the forward curve does.
    """
    hu = np.asarray(curve.hu)
    red = np.asarray(curve.relative_electron_density)
    keep = np.concatenate([[True], red[1:] > np.maximum.accumulate(red)[:-1]])
    hu, red = hu[keep], red[keep]
    d = np.asarray(density, dtype=np.float64)
    if red.size < 2:
        return np.full(d.shape, hu[0])
    out = np.interp(d, red, hu)
    lo = (hu[1] - hu[0]) / (red[1] - red[0])
    hi = (hu[-1] - hu[-2]) / (red[-1] - red[-2])
    out = np.where(d < red[0], hu[0] + (d - red[0]) * lo, out)
    return np.where(d > red[-1], hu[-1] + (d - red[-1]) * hi, out)


def _ct_cube_hu(ct: dict, path: Path) -> tuple[np.ndarray, dict, DensityCurve]:
    """The HU cube in MATLAB order (ny, nx, nz), float32; metadata; the density curve."""
    curve, hlut_note = _hlut_curve(ct, path)
    info: dict = {}
    if hlut_note:
        info["density_curve_from"] = hlut_note + "; default curve used"
    else:
        info["density_curve_from"] = "ct.hlut" if curve is not None else "default (the file has no ct.hlut)"
    density_curve = curve if curve is not None else DEFAULT_DENSITY_CURVE

    if not _is_empty(ct.get("cubeHU")):
        field = "ct.cubeHU"
        raw, n_scen = _first_scenario(ct["cubeHU"])
        info["ct_hu_from"] = "ct.cubeHU"
    elif not _is_empty(ct.get("cube")):
        field = "ct.cube"
        raw, n_scen = _first_scenario(ct["cube"])
    else:
        raise InputError("neither ct.cubeHU (HU) nor ct.cube (relative electron density) is present",
                         path, "ct.cubeHU")
    cube = _numeric(raw, path, field)
    if cube.ndim == 2:  # MATLAB drops trailing singleton dimensions: a one-slice cube
        cube = cube[:, :, None]
    if cube.ndim != 3:
        raise InputError(f"expected a 3-D cube [ny nx nz], found shape {cube.shape}", path, field)
    _check_finite(cube, path, field)
    if not _is_empty(ct.get("cubeDim")):
        dims = tuple(int(round(v)) for v in _vector(ct["cubeDim"], path, "ct.cubeDim"))
        dims = dims + (1,) * (3 - len(dims))
        if dims != cube.shape:
            raise InputError(f"{field} has shape {list(cube.shape)} ([ny nx nz]) but ct.cubeDim is {list(dims)}",
                             path, "ct.cubeDim")
    info["ct_scenarios"] = n_scen
    if n_scen > 1:
        info["ct_scenario_used"] = 1
    if field == "ct.cube":
        cube = _invert_density(density_curve, cube)
        info["ct_hu_from"] = (f"ct.cube (relative electron density; the file has no ct.cubeHU), converted to HU "
                              f"by inverting the density curve '{density_curve.name}'")
    return np.asarray(cube, dtype=np.float32), info, density_curve


def _check_finite(cube_yxz: np.ndarray, path: Path, field: str) -> None:
    """Refuse NaN or inf in a CT cube (one such voxel would make the whole dose NaN)."""
    bad = ~np.isfinite(cube_yxz)
    if bad.any():
        y, x, z = (int(i) + 1 for i in np.argwhere(bad)[0])
        raise InputError(f"{int(bad.sum())} of {cube_yxz.size} voxels are not finite (NaN or inf), e.g. "
                         f"[y x z] = [{y} {x} {z}] (1-based)", path, field)


def _ct_grid(ct: dict, shape_yxz: tuple[int, int, int], path: Path) -> tuple[Grid, dict]:
    res = ct.get("resolution")
    if not isinstance(res, dict):
        raise InputError("missing, or not a struct with fields x, y, z (mm)", path, "ct.resolution")
    spacing = {}
    for a in "xyz":
        v = _scalar(res.get(a), path, f"ct.resolution.{a}")
        if v <= 0:
            raise InputError(f"must be positive, got {v}", path, f"ct.resolution.{a}")
        spacing[a] = v
    ny, nx, nz = shape_yxz
    counts = {"x": nx, "y": ny, "z": nz}
    if all(not _is_empty(ct.get(a)) for a in "xyz"):
        origin = {}
        for a in "xyz":
            axis = _vector(ct[a], path, f"ct.{a}")
            if axis.size != counts[a]:
                raise InputError(f"has {axis.size} coordinates for {counts[a]} voxels", path, f"ct.{a}")
            # the mean step, not each step: some files round the coordinates to whole mm
            if axis.size > 1 and not np.isclose((axis[-1] - axis[0]) / (axis.size - 1), spacing[a], rtol=0.01):
                raise InputError(f"voxel coordinates do not step by ct.resolution.{a} = {spacing[a]} mm",
                                 path, f"ct.{a}")
            origin[a] = float(axis[0])
        origin_from = "ct.x, ct.y, ct.z"
    else:
        info = ct.get("dicomInfo")
        ipp = info.get("ImagePositionPatient") if isinstance(info, dict) else None
        if not _is_empty(ipp):
            v = _vector(ipp, path, "ct.dicomInfo.ImagePositionPatient")
            if v.size != 3:
                raise InputError("expected three numbers", path, "ct.dicomInfo.ImagePositionPatient")
            origin = dict(zip("xyz", v.tolist()))
            origin_from = "ct.dicomInfo.ImagePositionPatient (the file has no ct.x, ct.y, ct.z)"
        else:
            origin = {a: -counts[a] * spacing[a] / 2.0 for a in "xyz"}
            origin_from = ("matRad's default (the file has no ct.x, ct.y, ct.z): first voxel centre at "
                           "-n*d/2 along each axis, the cube centred on the origin to within half a voxel")
    grid = Grid((nz, ny, nx), (spacing["z"], spacing["y"], spacing["x"]), (origin["x"], origin["y"], origin["z"]))
    return grid, {"origin_from": origin_from}


def _structures(cst: Cell, grid: Grid, shape_yxz: tuple[int, int, int], path: Path) -> list[Structure]:
    rows = cst.items
    if rows.size == 0:
        return []
    if rows.ndim != 2 or rows.shape[1] < 4:
        raise InputError(f"expected one row per structure with at least 4 columns (index, name, type, voxels), "
                         f"found a cell of shape {rows.shape}", path, "cst")
    n_vox = int(np.prod(shape_yxz))
    out: list[Structure] = []
    seen: dict[str, int] = {}
    for r in range(rows.shape[0]):
        row = r + 1
        name = _text(rows[r, 1], path, f"cst{{{row},2}}").strip()
        if not name:
            raise InputError("empty structure name", path, f"cst{{{row},2}}")
        if name in seen:
            raise InputError(f"structure name {name!r} appears in rows {seen[name]} and {row}", path, f"cst{{{row},2}}")
        seen[name] = row
        matrad_type = _text(rows[r, 2], path, f"cst{{{row},3}} ({name})").strip()

        field = f"cst{{{row},4}}"
        raw, n_scen = _first_scenario(rows[r, 3])
        if raw is None or (isinstance(raw, np.ndarray) and raw.size == 0):
            raise InputError(f"structure {name!r} is empty (no voxel indices)", path, field)
        idx = _numeric(raw, path, f"{field} ({name})").ravel()
        if idx.dtype.kind == "f" and not np.all(np.isfinite(idx) & (idx == np.round(idx))):
            raise InputError(f"structure {name!r}: voxel indices must be whole numbers", path, field)
        idx = idx.astype(np.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 1 or hi > n_vox:
            raise InputError(f"structure {name!r}: voxel indices span {lo}..{hi}, outside 1..{n_vox} (1-based, "
                             f"column-major over the cube [ny nx nz] = {list(shape_yxz)})", path, field)
        flat = np.zeros(n_vox, dtype=bool)
        flat[idx - 1] = True
        mask = flat.reshape(shape_yxz, order="F").transpose(2, 0, 1)

        if matrad_type.upper() == "TARGET":
            kind = StructureKind.TARGET
        elif name.lower() in _EXTERNAL_NAMES:
            kind = StructureKind.EXTERNAL
        else:
            kind = StructureKind.OAR
        meta = {
            "matrad_row": row,
            "matrad_index": _plain(rows[r, 0]),
            "matrad_type": matrad_type,
            "matrad_properties": _plain(rows[r, 4]) if rows.shape[1] > 4 and not _is_empty(rows[r, 4]) else {},
            "matrad_objectives": _objectives(rows[r, 5]) if rows.shape[1] > 5 else [],
        }
        if n_scen > 1:
            meta["matrad_voxel_scenarios"] = n_scen
        out.append(Structure(name, kind, mask, grid, default_colour(len(out)), meta))
    return out


def _objectives(v) -> list[dict]:
    """matRad objectives and constraints (structs or class objects) as plain dicts."""
    if _is_empty(v):
        return []
    if isinstance(v, Cell):
        elements = []
        for e in v.column_major():
            elements.extend(e.column_major() if isinstance(e, Cell) else (e if isinstance(e, list) else [e]))
    elif isinstance(v, list):
        elements = v
    else:
        elements = [v]
    return [_objective(e) for e in elements if not _is_empty(e)]


def _objective(e) -> dict:
    if isinstance(e, Opaque):
        # A classdef object saved as such: MATLAB's object store is not decoded here.
        return {"class": e.matlab_class, "parameters": [], "penalty": None, "decoded": False}
    if not isinstance(e, dict):
        return {"class": "", "parameters": _plain_list(e), "penalty": None}
    used = set()
    cls = ""
    for key in ("className", "name", "type"):
        if isinstance(e.get(key), str) and e[key].strip():
            cls = e[key].strip()
            used.add(key)
            break
    if "parameters" in e:
        params = _plain_list(e["parameters"])
        used.add("parameters")
    else:  # matRad before 2019: dose, EUD and volume fields instead of a parameter list
        params = []
        for key in ("dose", "EUD", "volume"):
            if key in e and not _is_empty(e[key]):
                params.extend(_plain_list(e[key]))
                used.add(key)
    penalty = _plain(e["penalty"]) if not _is_empty(e.get("penalty")) else None
    used.add("penalty")
    out = {"class": cls, "parameters": params, "penalty": penalty}
    extra = {k: _plain(x) for k, x in e.items() if k not in used}
    if extra:
        out["extra"] = extra
    return out


# ------------------------------------------------------------------ machine
def read_matrad_machine(path: "str | Path", ssd_mm: float = 950.0):
    """Read a matRad photon machine (variable ``machine``) as a :class:`~ids_engine.model.PhotonMachine`.

    Both MATLAB v5 and v7.3 (HDF5) files are read.

    matRad tabulates the lateral kernels of its three SVD components for many SSDs
    (``machine.data.kernel``, a struct array). All sets are kept (``kernel_ssds_mm``,
    ``kernel_sets_per_mm2``) and the dose engine picks, per beam, the set tabulated nearest
    the beam's central-axis SSD, as matRad's photon engine does (initBeam of
    matRad_PhotonPencilBeamSVDEngine: the ray nearest the central axis, its SSD from
    matRad_computeSSD, then ``min(abs([machine.data.kernel.SSD] - SSD))``). The set nearest
    ``ssd_mm`` is the machine's default ``kernels_per_mm2`` (``meta["kernel_ssd_mm"]``), for
    uses without a beam. matRad's kernels carry the components' amplitudes,
    so the weights are (1, 1, 1), and since each SVD component mixes primary and scatter,
    all three are narrow (``narrow_components=(0, 1, 2)``).

    Kernel units. Current files (``machine.version`` 2) store kernels in 1/mm^2. Older
    files (version 1, or no version field) store them per (0.5 mm)^2 pixel of matRad's
    convolution grid, a factor of 4 smaller; this reader multiplies those by 4 (as pyRadPlan
    does) and says so in ``meta["kernel_normalisation"]``. The kernels have a sharp peak
    at r = 0 that matRad's 0.5 mm convolution grid samples as one pixel, so their plane
    integral depends on the sampling: ``meta["kernel_integral_matrad_grid"]`` gives the sum
    over that grid (what matRad uses), ``meta["kernel_integral_radial"]`` the radial
    trapezoid integral.

    Other data kept in ``meta``: source-collimator distance, description, penumbra FWHM
    at the isocentre, the primary fluence profile (matRad applies both to the fluence).

    Parameters
    ----------
    path : the .mat file.
    ssd_mm : source-surface distance (mm) whose kernels are the default set; the engine
        chooses per beam regardless.

    Raises
    ------
    InputError naming the file and the field: not a .mat file, no ``machine``, a
    non-photon machine, missing or malformed fields (SAD, energy, m, betas, kernelPos,
    kernel and its SSD, kernel1..kernel3).
    """
    # dose sits above io in the layer order; the machine type is imported where it is built.
    from ..model import PhotonMachine

    path, variables, info = _load(path, ("machine",))
    machine = variables.get("machine")
    if machine is None:
        raise InputError("no variable 'machine' in the file", path, "machine")
    if not isinstance(machine, dict):
        raise InputError(f"expected a struct, found {_describe(machine)}", path, "machine")
    meta_in = machine.get("meta")
    if not isinstance(meta_in, dict):
        raise InputError("missing, or not a struct", path, "machine.meta")
    mode = _text(meta_in.get("radiationMode"), path, "machine.meta.radiationMode").strip()
    if mode.lower() != "photons":
        raise InputError(f"radiation mode is {mode!r}; only photon machines can be read", path,
                         "machine.meta.radiationMode")
    sad = _scalar(meta_in.get("SAD"), path, "machine.meta.SAD")
    if sad <= 0:
        raise InputError(f"must be positive, got {sad}", path, "machine.meta.SAD")
    name = meta_in.get("name") if isinstance(meta_in.get("name"), str) and meta_in["name"].strip() else path.stem

    data = machine.get("data")
    energies_note = None
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        energies_note = [_scalar(d.get("energy"), path, f"machine.data({i + 1}).energy") for i, d in enumerate(data)]
        data = data[0]
    if not isinstance(data, dict):
        raise InputError("missing, or not a struct", path, "machine.data")
    energy = _scalar(data.get("energy"), path, "machine.data.energy")
    m = _scalar(data.get("m"), path, "machine.data.m")
    betas = _vector(data.get("betas"), path, "machine.data.betas")
    if betas.size != 3:
        raise InputError(f"expected 3 values (one per kernel component), found {betas.size}", path,
                         "machine.data.betas")
    radius = _vector(data.get("kernelPos"), path, "machine.data.kernelPos")
    if radius.size < 2 or radius[0] != 0 or np.any(np.diff(radius) <= 0):
        raise InputError("radial positions must start at 0 mm and increase", path, "machine.data.kernelPos")

    kernels = data.get("kernel")
    if isinstance(kernels, dict):
        kernels = [kernels]
    if not isinstance(kernels, list) or not kernels or not all(isinstance(k, dict) for k in kernels):
        raise InputError(f"expected a struct array over SSD (fields SSD, kernel1..kernel3), found {_describe(kernels)}",
                         path, "machine.data.kernel")
    ssds = np.array([_scalar(k.get("SSD"), path, f"machine.data.kernel({i + 1}).SSD") for i, k in enumerate(kernels)])
    pick = int(np.argmin(np.abs(ssds - float(ssd_mm))))
    sets = []
    for s_i, entry in enumerate(kernels):
        profiles = []
        for c in (1, 2, 3):
            field = f"machine.data.kernel({s_i + 1}).kernel{c}"
            k = _vector(entry.get(f"kernel{c}"), path, field)
            if k.size != radius.size:
                raise InputError(f"has {k.size} values for {radius.size} positions in machine.data.kernelPos", path, field)
            profiles.append(k)
        sets.append(np.stack(profiles))

    version = _scalar(machine["version"], path, "machine.version") if not _is_empty(machine.get("version")) else None
    if version is None or version < 2:
        scale = 4.0
        normalisation = (f"machine.version {'absent' if version is None else f'{version:g}'}: kernels are stored per "
                         f"({_MATRAD_CONVOLUTION_MM} mm)^2 convolution pixel; multiplied by 4 to give 1/mm^2 "
                         f"(as pyRadPlan does for version < 2)")
    else:
        scale = 1.0
        normalisation = f"machine.version {version:g}: kernels in 1/mm^2, used as stored"
    kernel_sets = np.stack(sets) * scale
    kernels_per_mm2 = kernel_sets[pick]

    meta = {
        **info,
        "radiation_mode": mode,
        "machine_file_version": version,
        "kernel_normalisation": normalisation,
        "kernel_ssd_mm": float(ssds[pick]),
        "requested_ssd_mm": float(ssd_mm),
        "kernel_ssd_range_mm": (float(ssds.min()), float(ssds.max())),
        "kernel_ssd_count": int(ssds.size),
        "kernel_integral_radial": tuple(float(np.trapezoid(2 * np.pi * radius * k, radius)) for k in kernels_per_mm2),
        "kernel_integral_matrad_grid": _grid_integrals(radius, kernels_per_mm2, _MATRAD_CONVOLUTION_MM),
        "kernel_integral_matrad_grid_mm": _MATRAD_CONVOLUTION_MM,
    }
    if not ssds.min() <= ssd_mm <= ssds.max():
        meta["kernel_ssd_note"] = f"requested SSD {ssd_mm:g} mm lies outside the tabulated range; nearest used"
    if energies_note is not None:
        meta["energies_in_file_mv"] = energies_note
        meta["energy_note"] = "the file holds several energies; the first is used"
    for key, out_key in (("SCD", "scd_mm"), ("description", "description")):
        if not _is_empty(meta_in.get(key)):
            meta[out_key] = _plain(meta_in[key])
    if not _is_empty(data.get("penumbraFWHMatIso")):
        meta["penumbra_fwhm_at_iso_mm"] = _scalar(data["penumbraFWHMatIso"], path, "machine.data.penumbraFWHMatIso")
    fluence = data.get("primaryFluence")
    if isinstance(fluence, np.ndarray) and fluence.ndim == 2 and fluence.shape[1] == 2 and fluence.shape[0] >= 1:
        meta["primary_fluence_radius_mm"] = tuple(float(v) for v in fluence[:, 0])
        meta["primary_fluence_relative"] = tuple(float(v) for v in fluence[:, 1])

    pixel_mm = _MATRAD_CONVOLUTION_MM
    meta["kernels_as_stored_per_mm2"] = kernels_per_mm2.copy()
    fwhm = meta.get("penumbra_fwhm_at_iso_mm")
    if fwhm and fwhm > 0 and radius.size > 1 and np.allclose(np.diff(radius), _MATRAD_CONVOLUTION_MM) and radius[0] == 0:
        # matRad convolves the fluence with a Gaussian of the source's penumbra FWHM before the
        # kernels; convolving the kernels instead is the same (convolution is associative) and
        # turns matRad's pixel kernels (a spike in the r = 0 pixel) into smooth radial profiles.
        kernel_sets = np.stack([_with_source_penumbra(radius, ks, float(fwhm)) for ks in kernel_sets])
        kernels_per_mm2 = kernel_sets[pick]
        pixel_mm = None
        meta["source_penumbra"] = f"kernels convolved with a Gaussian of FWHM {float(fwhm):g} mm (machine.data.penumbraFWHMatIso)"

    try:
        return PhotonMachine(
            name=str(name).strip(),
            energy_mv=energy,
            sad_mm=sad,
            attenuation_per_mm=m,
            betas_per_mm=tuple(betas.tolist()),
            weights=(1.0, 1.0, 1.0),
            kernel_radius_mm=radius,
            kernels_per_mm2=kernels_per_mm2,
            source=f"matRad machine file {path.name}",
            narrow_components=(0, 1, 2),
            kernel_pixel_mm=pixel_mm,
            meta=meta,
            kernel_ssds_mm=tuple(float(v) for v in ssds),
            kernel_sets_per_mm2=kernel_sets,
            kernel_ssd_mm=float(ssds[pick]),
        )
    except ValueError as exc:
        raise InputError(str(exc), path, "machine.data") from None


def _grid_integrals(radius: np.ndarray, kernels: np.ndarray, pitch_mm: float) -> tuple[float, float, float]:
    """Sum of each radial kernel sampled on a square grid of ``pitch_mm`` (times the pixel area)."""
    n = int(np.ceil(radius[-1] / pitch_mm))
    g = pitch_mm * np.arange(-n, n + 1)
    r = np.hypot(g[:, None], g[None, :])
    return tuple(float(pitch_mm**2 * np.interp(r, radius, k, right=0.0).sum()) for k in kernels)


def _with_source_penumbra(radius: np.ndarray, kernels: np.ndarray, fwhm_mm: float) -> np.ndarray:
    """Radial kernels (matRad pixel convention, 0.5 mm pixels) convolved with a 2D Gaussian of
    ``fwhm_mm``, returned as radial profiles in 1/mm^2 on the same radii."""
    from scipy.signal import fftconvolve

    a = _MATRAD_CONVOLUTION_MM
    n = radius.size - 1
    xs = np.arange(-n, n + 1) * a
    r = np.hypot(xs[None, :], xs[:, None])
    sigma = fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    half = int(np.ceil(4 * sigma / a))
    gx = np.arange(-half, half + 1) * a
    g = np.exp(-(gx[None, :] ** 2 + gx[:, None] ** 2) / (2 * sigma**2))
    g /= g.sum()
    out = []
    for k in kernels:
        img = np.interp(r, radius, k, right=0.0)
        conv = fftconvolve(img, g, mode="same")
        out.append(conv[n, n:])  # the +x half row through the centre: values at radius[0..n]
    return np.stack(out)
