"""The matRad reader: synthetic phantoms and photon machines in MATLAB v5 and v7.3 files.

The files are written by the tests themselves: v5 with :func:`scipy.io.savemat`, v7.3 with
h5py in the layout MATLAB uses (see :func:`write_v73`). Real matRad files (pyRadPlan's
``data/phantoms/*.mat`` and ``data/machines/photons_Generic.mat``) are used only when the
environment variable ``IDS_MATRAD_DATA`` names a folder holding them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from ids_engine.io import InputError, read_matrad_machine, read_matrad_phantom
from ids_engine.io._matrad_mat import Cell, Opaque, load_mat_variables
from ids_engine.model import DEFAULT_DENSITY_CURVE, StructureKind, default_colour

FORMATS = ("v5", "v73")


# ---------------------------------------------------------------- writers
class StructArray(list):
    """A 1 x n MATLAB struct array (a list of dicts with the same fields)."""


def cell(*items, shape=None) -> np.ndarray:
    """A MATLAB cell array (1 x n unless ``shape`` is given)."""
    out = np.empty(shape or (1, len(items)), dtype=object)
    for i, v in enumerate(items):
        out.flat[i] = v
    return out


_MATLAB_CLASS = {
    np.dtype(np.float64): "double", np.dtype(np.float32): "single",
    np.dtype(np.int8): "int8", np.dtype(np.int16): "int16", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64",
    np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16", np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
}


def write_v73(path: Path, variables: dict) -> None:
    """Write ``variables`` as MATLAB does with ``save -v7.3``.

    dict -> struct group (``MATLAB_fields`` gives the field order); :class:`StructArray` ->
    struct group of reference datasets without ``MATLAB_class``; object ndarray -> cell
    (references into ``#refs#``); str -> char (uint16); bool -> logical (uint8); numbers
    -> their class. Every array is written transposed (MATLAB is column-major).
    """
    counter = itertools.count()
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def ref_to(value):
            key = f"r{next(counter)}"
            put(refs, key, value)
            return refs[key].ref

        def fields_attr(names):
            vlen = h5py.vlen_dtype(np.dtype("S1"))
            attr = np.empty(len(names), dtype=object)
            for i, n in enumerate(names):
                attr[i] = np.array(list(n), dtype="S1")
            return attr, vlen

        def put(parent, name, value):
            if isinstance(value, StructArray):
                g = parent.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_("struct")
                names = list(value[0])
                attr, vlen = fields_attr(names)
                g.attrs.create("MATLAB_fields", attr, dtype=vlen)
                for k in names:
                    r = np.array([[ref_to(e[k])] for e in value], dtype=h5py.ref_dtype)  # (n, 1) = 1 x n transposed
                    g.create_dataset(k, data=r)
                return
            if isinstance(value, dict):
                g = parent.create_group(name)
                g.attrs["MATLAB_class"] = np.bytes_("struct")
                attr, vlen = fields_attr(list(value))
                g.attrs.create("MATLAB_fields", attr, dtype=vlen)
                for k, v in value.items():
                    put(g, k, v)
                return
            if isinstance(value, str):
                if not value:
                    ds = parent.create_dataset(name, data=np.array([0, 0], dtype=np.uint64))
                    ds.attrs["MATLAB_empty"] = np.uint8(1)
                else:
                    codes = np.frombuffer(value.encode("utf-16-le"), dtype="<u2")
                    ds = parent.create_dataset(name, data=codes.reshape(-1, 1))
                    ds.attrs["MATLAB_int_decode"] = np.int32(2)
                ds.attrs["MATLAB_class"] = np.bytes_("char")
                return
            arr = np.asarray(value)
            if arr.dtype == object:
                arr = arr if arr.ndim >= 2 else arr.reshape(1, -1)
                r = np.empty(arr.shape, dtype=h5py.ref_dtype)
                for idx in np.ndindex(arr.shape):
                    r[idx] = ref_to(arr[idx])
                ds = parent.create_dataset(name, data=r.T)
                ds.attrs["MATLAB_class"] = np.bytes_("cell")
                return
            arr = np.atleast_2d(arr)
            cls = "logical" if arr.dtype == bool else _MATLAB_CLASS[arr.dtype]
            if arr.size == 0:
                ds = parent.create_dataset(name, data=np.array(arr.shape, dtype=np.uint64))
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            else:
                ds = parent.create_dataset(name, data=(arr.astype(np.uint8) if cls == "logical" else arr).T)
            if cls == "logical":
                ds.attrs["MATLAB_int_decode"] = np.int32(1)
            ds.attrs["MATLAB_class"] = np.bytes_(cls)

        for name, value in variables.items():
            put(f, name, value)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: ids-engine tests HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116) + b" " * 8 + b"\x00\x02" + b"IM")


def _to_v5(value):
    """StructArray -> a numpy record array, which scipy writes as a MATLAB struct array."""
    if isinstance(value, StructArray):
        names = list(value[0])
        rec = np.empty((1, len(value)), dtype=[(n, object) for n in names])
        for i, e in enumerate(value):
            for n in names:
                rec[0, i][n] = _to_v5(e[n])
        return rec
    if isinstance(value, dict):
        return {k: _to_v5(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype == object:
        out = np.empty(value.shape, dtype=object)
        for idx in np.ndindex(value.shape):
            out[idx] = _to_v5(value[idx])
        return out
    return value


def write_mat(path: Path, variables: dict, fmt: str) -> Path:
    if fmt == "v5":
        scipy.io.savemat(path, {k: _to_v5(v) for k, v in variables.items()}, do_compression=True, oned_as="row")
    else:
        write_v73(path, variables)
    return path


# -------------------------------------------------------------- phantoms
NY, NX, NZ = 5, 4, 3  # MATLAB cube [ny nx nz]: all different, so a swapped axis shows
RES = {"x": 3.0, "y": 2.0, "z": 2.5}
ORIGIN = {"x": -10.0, "y": 4.0, "z": -2.5}


def _encoded_cube() -> np.ndarray:
    """HU = 100*y + 10*x + z (0-based MATLAB subscripts) - 500: every voxel unique."""
    y, x, z = np.meshgrid(np.arange(NY), np.arange(NX), np.arange(NZ), indexing="ij")
    return (100.0 * y + 10.0 * x + z - 500.0).astype(np.float64)


def _linear(subs_yxz) -> np.ndarray:
    """1-based column-major linear indices of 0-based [y x z] subscripts."""
    ys, xs, zs = np.asarray(subs_yxz).T
    return (np.ravel_multi_index((ys, xs, zs), (NY, NX, NZ), order="F") + 1).astype(np.float64)


PTV_SUBS = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 2, 2)]
CORD_SUBS = [(4, 3, 0), (4, 3, 1), (4, 3, 2)]
BODY_SUBS = [(y, x, z) for y in range(NY) for x in range(NX) for z in range(NZ) if 0 < y < NY and x < NX - 1]

PTV_OBJECTIVE = {"className": "DoseObjectives.matRad_SquaredDeviation", "parameters": cell(60.0), "penalty": 1000.0}
CORD_OBJECTIVES = (
    {"className": "DoseObjectives.matRad_SquaredOverdosing", "parameters": cell(45.0), "penalty": 300.0},
    {"className": "DoseConstraints.matRad_MinMaxDVH", "parameters": cell(30.0, 0.0, 50.0), "penalty": 1.0},
)


def _props(priority: int) -> dict:
    return {"Priority": float(priority), "alphaX": 0.1, "betaX": 0.05, "Visible": 1.0}


def _phantom_vars(*, ct_changes=None, drop_ct=(), cst_rows=None) -> dict:
    ct = {
        "cubeHU": cell(_encoded_cube()),
        "resolution": dict(RES),
        "x": ORIGIN["x"] + RES["x"] * np.arange(NX),
        "y": ORIGIN["y"] + RES["y"] * np.arange(NY),
        "z": ORIGIN["z"] + RES["z"] * np.arange(NZ),
        "cubeDim": np.array([NY, NX, NZ], dtype=np.float64),
        "numOfCtScen": 1.0,
    }
    ct.update(ct_changes or {})
    for k in drop_ct:
        ct.pop(k)
    rows = cst_rows if cst_rows is not None else [
        (0.0, "PTV", "TARGET", cell(_linear(PTV_SUBS).reshape(-1, 1)), _props(1), cell(PTV_OBJECTIVE)),
        (1.0, "Cord", "OAR", cell(_linear(CORD_SUBS).reshape(-1, 1)), _props(2), cell(*CORD_OBJECTIVES)),
        (2.0, "BODY", "OAR", cell(_linear(BODY_SUBS).reshape(-1, 1)), _props(3), cell()),
    ]
    cst = np.empty((len(rows), 6), dtype=object)
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            cst[r, c] = v
    return {"ct": ct, "cst": cst}


def _mask_of(subs_yxz) -> np.ndarray:
    m = np.zeros((NZ, NY, NX), dtype=bool)
    for y, x, z in subs_yxz:
        m[z, y, x] = True
    return m


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


def test_phantom_cube_orientation_grid_and_structures(tmp_path, fmt):
    path = write_mat(tmp_path / f"box_{fmt}.mat", _phantom_vars(), fmt)
    p = read_matrad_phantom(path)

    assert p.ct_hu.shape == (NZ, NY, NX)
    assert p.ct_hu.dtype == np.float32
    k, j, i = np.meshgrid(np.arange(NZ), np.arange(NY), np.arange(NX), indexing="ij")
    np.testing.assert_array_equal(p.ct_hu, 100.0 * j + 10.0 * i + k - 500.0)
    # one voxel by hand: MATLAB cubeHU(3, 2, 3) (1-based [y x z]) is our [2, 2, 1]
    assert p.ct_hu[2, 2, 1] == 100 * 2 + 10 * 1 + 2 - 500

    assert p.grid.spacing_mm_zyx == (RES["z"], RES["y"], RES["x"])
    assert p.grid.origin_mm_xyz == (ORIGIN["x"], ORIGIN["y"], ORIGIN["z"])
    assert p.meta["origin_from"] == "ct.x, ct.y, ct.z"
    assert p.meta["file_format"] == ("MATLAB v5" if fmt == "v5" else "MATLAB v7.3 (HDF5)")
    assert p.name == f"box_{fmt}"
    assert p.patient_position == "HFS"
    assert p.density_curve is DEFAULT_DENSITY_CURVE

    assert p.structure_names == ("PTV", "Cord", "BODY")
    assert [s.kind for s in p.structures] == [StructureKind.TARGET, StructureKind.OAR, StructureKind.EXTERNAL]
    assert [s.colour for s in p.structures] == [default_colour(i) for i in range(3)]
    for name, subs in (("PTV", PTV_SUBS), ("Cord", CORD_SUBS), ("BODY", BODY_SUBS)):
        np.testing.assert_array_equal(p.structure(name).mask, _mask_of(subs))
    assert p.structure("BODY").meta["matrad_type"] == "OAR"


def test_phantom_properties_and_objectives(tmp_path, fmt):
    p = read_matrad_phantom(write_mat(tmp_path / "box.mat", _phantom_vars(), fmt))
    ptv, cord, body = p.structures
    assert ptv.meta["matrad_properties"] == {"Priority": 1, "alphaX": 0.1, "betaX": 0.05, "Visible": 1}
    assert ptv.meta["matrad_objectives"] == [
        {"class": "DoseObjectives.matRad_SquaredDeviation", "parameters": [60.0], "penalty": 1000.0}
    ]
    assert cord.meta["matrad_objectives"] == [
        {"class": "DoseObjectives.matRad_SquaredOverdosing", "parameters": [45.0], "penalty": 300.0},
        {"class": "DoseConstraints.matRad_MinMaxDVH", "parameters": [30.0, 0.0, 50.0], "penalty": 1.0},
    ]
    assert body.meta["matrad_objectives"] == []
    assert (ptv.meta["matrad_row"], cord.meta["matrad_index"]) == (1, 1)


def test_objective_variants(tmp_path, fmt):
    """A bare struct (not in a cell), numeric parameters, the pre-2019 fields, extras."""
    old_style = {"type": "square overdosing", "dose": 40.0, "penalty": 50.0, "robustness": "none"}
    named = {"name": "Max DVH", "parameters": np.array([30.0, 0.5]), "penalty": 2.0}
    rows = [
        (0.0, "PTV", "TARGET", cell(_linear(PTV_SUBS).reshape(-1, 1)), _props(1), named),
        (1.0, "Cord", "OAR", cell(_linear(CORD_SUBS).reshape(-1, 1)), _props(2), cell(old_style)),
    ]
    p = read_matrad_phantom(write_mat(tmp_path / "obj.mat", _phantom_vars(cst_rows=rows), fmt))
    assert p.structure("PTV").meta["matrad_objectives"] == [
        {"class": "Max DVH", "parameters": [30.0, 0.5], "penalty": 2.0}
    ]
    assert p.structure("Cord").meta["matrad_objectives"] == [
        {"class": "square overdosing", "parameters": [40.0], "penalty": 50.0, "extra": {"robustness": "none"}}
    ]


def test_plain_array_cube_and_index_vector_without_cells(tmp_path, fmt):
    """cubeHU and voxel lists may be plain arrays rather than one-scenario cells."""
    rows = [(0.0, "PTV", "TARGET", _linear(PTV_SUBS), _props(1), cell())]
    variables = _phantom_vars(ct_changes={"cubeHU": _encoded_cube().astype(np.int16)}, cst_rows=rows)
    p = read_matrad_phantom(write_mat(tmp_path / "plain.mat", variables, fmt))
    assert p.ct_hu[1, 3, 2] == 100 * 3 + 10 * 2 + 1 - 500
    np.testing.assert_array_equal(p.structure("PTV").mask, _mask_of(PTV_SUBS))


def test_density_cube_without_hu_is_converted(tmp_path, fmt):
    hu = _encoded_cube()
    density = DEFAULT_DENSITY_CURVE(hu).astype(np.float64)
    variables = _phantom_vars(ct_changes={"cube": cell(density)}, drop_ct=("cubeHU",))
    p = read_matrad_phantom(write_mat(tmp_path / "density.mat", variables, fmt))
    assert "ct.cube" in p.meta["ct_hu_from"]
    k, j, i = np.meshgrid(np.arange(NZ), np.arange(NY), np.arange(NX), indexing="ij")
    np.testing.assert_allclose(p.ct_hu, 100.0 * j + 10.0 * i + k - 500.0, atol=0.05)
    np.testing.assert_allclose(p.relative_electron_density(), np.transpose(density, (2, 0, 1)), rtol=1e-5)


def test_hlut_becomes_the_density_curve(tmp_path, fmt):
    hlut = np.array([[-1024.0, 0.00324], [200.0, 1.2], [449.0, 1.2], [2000.0, 2.49066]])
    hu = _encoded_cube()
    red = np.interp(hu, hlut[:, 0], hlut[:, 1])
    variables = _phantom_vars(ct_changes={"cube": cell(red), "hlut": hlut}, drop_ct=("cubeHU",))
    p = read_matrad_phantom(write_mat(tmp_path / "hlut.mat", variables, fmt))
    assert p.density_curve.hu == tuple(hlut[:, 0])
    assert p.meta["density_curve_from"] == "ct.hlut"
    np.testing.assert_allclose(p.ct_hu, np.transpose(hu, (2, 0, 1)), atol=0.05)  # all below the plateau


def test_origin_without_axes_follows_matrad(tmp_path, fmt):
    variables = _phantom_vars(drop_ct=("x", "y", "z"))
    p = read_matrad_phantom(write_mat(tmp_path / "noaxes.mat", variables, fmt))
    assert p.grid.origin_mm_xyz == pytest.approx((-NX * RES["x"] / 2, -NY * RES["y"] / 2, -NZ * RES["z"] / 2))
    assert "default" in p.meta["origin_from"]


def test_first_ct_scenario_is_used(tmp_path, fmt):
    cube = _encoded_cube()
    variables = _phantom_vars(ct_changes={"cubeHU": cell(cube, cube + 7)})
    p = read_matrad_phantom(write_mat(tmp_path / "scen.mat", variables, fmt))
    np.testing.assert_array_equal(p.ct_hu, np.transpose(cube, (2, 0, 1)))
    assert p.meta["ct_scenarios"] == 2


def test_one_slice_cube(tmp_path, fmt):
    """MATLAB drops a trailing singleton dimension: a one-slice cube is saved 2-D."""
    cube = _encoded_cube()[:, :, :1]
    rows = [(0.0, "PTV", "TARGET", cell(_linear([(1, 1, 0), (2, 3, 0)]).reshape(-1, 1)), _props(1), cell())]
    variables = _phantom_vars(ct_changes={"cubeHU": cell(cube[:, :, 0]), "cubeDim": np.array([NY, NX, 1.0]),
                                          "z": np.array([0.0])}, cst_rows=rows)
    p = read_matrad_phantom(write_mat(tmp_path / "slice.mat", variables, fmt))
    assert p.grid.shape_zyx == (1, NY, NX)
    assert p.structure("PTV").mask[0, 2, 3]


# ----------------------------------------------------------- bad phantoms
def _bad(tmp_path, fmt, variables, name="bad.mat") -> InputError:
    path = write_mat(tmp_path / name, variables, fmt)
    with pytest.raises(InputError) as info:
        read_matrad_phantom(path)
    assert name in str(info.value)
    return info.value


def _row(name, subs_or_indices, kind="OAR"):
    idx = subs_or_indices if isinstance(subs_or_indices, np.ndarray) else _linear(subs_or_indices)
    return (0.0, name, kind, cell(idx.reshape(-1, 1)), _props(1), cell())


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("no ct", "ct", "no variable 'ct'"),
        ("no cst", "cst", "no variable 'cst'"),
        ("no cube", "ct.cubeHU", "neither"),
        ("cubeDim", "ct.cubeDim", "[5, 4, 3]"),
        ("resolution", "ct.resolution.y", "missing"),
        ("axis length", "ct.x", "coordinates"),
        ("axis step", "ct.y", "step"),
        ("out of range", "cst{2,4}", "'Cord'"),
        ("zero index", "cst{2,4}", "'Cord'"),
        ("empty", "cst{2,4}", "'Cord' is empty"),
        ("duplicate", "cst{2,2}", "'PTV'"),
    ],
)
def test_bad_phantoms_name_file_and_field(tmp_path, fmt, case, field, words):
    v = _phantom_vars()
    ptv = _row("PTV", PTV_SUBS, "TARGET")
    if case == "no ct":
        del v["ct"]
    elif case == "no cst":
        del v["cst"]
    elif case == "no cube":
        v = _phantom_vars(drop_ct=("cubeHU",))
    elif case == "cubeDim":
        v = _phantom_vars(ct_changes={"cubeDim": np.array([NX, NY, NZ], dtype=np.float64)})
    elif case == "resolution":
        v = _phantom_vars(ct_changes={"resolution": {"x": 3.0, "z": 2.5}})
    elif case == "axis length":
        v = _phantom_vars(ct_changes={"x": np.arange(NX + 1.0)})
    elif case == "axis step":
        v = _phantom_vars(ct_changes={"y": ORIGIN["y"] + 2 * RES["y"] * np.arange(NY)})
    elif case == "out of range":
        v = _phantom_vars(cst_rows=[ptv, _row("Cord", np.array([1.0, NY * NX * NZ + 1.0]))])
    elif case == "zero index":
        v = _phantom_vars(cst_rows=[ptv, _row("Cord", np.array([0.0, 5.0]))])
    elif case == "empty":
        v = _phantom_vars(cst_rows=[ptv, _row("Cord", np.zeros((0, 1)))])
    elif case == "duplicate":
        v = _phantom_vars(cst_rows=[ptv, _row("PTV", CORD_SUBS)])
    err = _bad(tmp_path, fmt, v)
    assert err.field == field
    assert f": {field}: " in str(err)
    assert words in str(err)


def test_not_a_mat_file(tmp_path):
    path = tmp_path / "notes.mat"
    path.write_text("this is not a MATLAB file\n" * 20)
    with pytest.raises(InputError, match="notes.mat"):
        read_matrad_phantom(path)
    with pytest.raises(InputError, match="notes.mat"):
        read_matrad_machine(path)


def test_hdf5_file_that_is_not_matlab(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("something", data=np.arange(4))
    with pytest.raises(InputError, match=r"plain\.h5: ct: "):
        read_matrad_phantom(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="absent.mat"):
        read_matrad_phantom(tmp_path / "absent.mat")


# ---------------------------------------------------------------- machine
R_MM = np.arange(0.0, 180.0, 0.5)


def _gauss(sigma: float) -> np.ndarray:
    return np.exp(-(R_MM**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def _machine_vars(*, version=2.0, mode="photons", kernel_fields=None, data_changes=None) -> dict:
    kernels = StructArray([
        {"SSD": 900.0, "kernel1": _gauss(2.0), "kernel2": 0.1 * _gauss(10.0), "kernel3": 0.3 * _gauss(40.0)},
        {"SSD": 1000.0, "kernel1": _gauss(2.5), "kernel2": 0.1 * _gauss(12.0), "kernel3": 0.3 * _gauss(45.0)},
    ])
    if kernel_fields is not None:
        kernels = StructArray([{k: e[k] for k in kernel_fields} for e in kernels])
    data = {
        "betas": np.array([0.3, 0.05, 0.01]),
        "energy": 6.0,
        "m": 0.005,
        "primaryFluence": np.array([[0.0, 1.0], [100.0, 1.05], [300.0, 0.02]]),
        "kernel": kernels,
        "kernelPos": R_MM,
        "penumbraFWHMatIso": 5.0,
    }
    data.update(data_changes or {})
    meta = {"radiationMode": mode, "dataType": "-", "description": "synthetic 6 MV", "SAD": 1000.0,
            "SCD": 500.0, "name": "Synthetic"}
    machine = {"meta": meta, "data": data}
    if version is not None:
        machine["version"] = version
    return {"machine": machine}


@pytest.mark.parametrize(
    ("ssd", "chosen", "sigmas"), [(980.0, 1000.0, (2.5, 12.0, 45.0)), (910.0, 900.0, (2.0, 10.0, 40.0))]
)
def test_machine_fields_and_nearest_ssd(tmp_path, fmt, ssd, chosen, sigmas):
    path = write_mat(tmp_path / f"photons_{fmt}.mat", _machine_vars(), fmt)
    m = read_matrad_machine(path, ssd_mm=ssd)
    assert m.name == "Synthetic"
    assert (m.energy_mv, m.sad_mm, m.attenuation_per_mm) == (6.0, 1000.0, 0.005)
    assert m.betas_per_mm == (0.3, 0.05, 0.01)
    assert m.weights == (1.0, 1.0, 1.0)
    assert m.narrow_components == (0, 1, 2)
    assert m.source == f"matRad machine file photons_{fmt}.mat"
    np.testing.assert_array_equal(m.kernel_radius_mm, R_MM)
    expected = np.stack([_gauss(sigmas[0]), 0.1 * _gauss(sigmas[1]), 0.3 * _gauss(sigmas[2])])
    np.testing.assert_allclose(m.meta["kernels_as_stored_per_mm2"], expected, rtol=1e-12)
    assert m.meta["kernel_ssd_mm"] == chosen
    assert m.meta["kernel_ssd_range_mm"] == (900.0, 1000.0)
    assert m.meta["machine_file_version"] == 2.0
    assert m.meta["scd_mm"] == 500.0
    assert m.meta["penumbra_fwhm_at_iso_mm"] == 5.0
    assert m.meta["primary_fluence_relative"] == (1.0, 1.05, 0.02)
    # the Gaussians integrate to their amplitudes (the two integrals agree for smooth kernels)
    np.testing.assert_allclose(m.meta["kernel_integral_radial"], (1.0, 0.1, 0.3), rtol=1e-2)
    np.testing.assert_allclose(m.meta["kernel_integral_matrad_grid"], (1.0, 0.1, 0.3), rtol=5e-3)


def test_single_kernel_entry(tmp_path, fmt):
    """A struct array of one element is a plain struct in MATLAB's files."""
    v = _machine_vars()
    v["machine"]["data"]["kernel"] = dict(v["machine"]["data"]["kernel"][1])
    m = read_matrad_machine(write_mat(tmp_path / "one.mat", v, fmt), ssd_mm=500.0)
    assert m.meta["kernel_ssd_mm"] == 1000.0
    assert "outside the tabulated range" in m.meta["kernel_ssd_note"]


@pytest.mark.parametrize("version", [1.0, None])
def test_old_machine_kernels_scaled_by_four(tmp_path, fmt, version):
    m = read_matrad_machine(write_mat(tmp_path / "old.mat", _machine_vars(version=version), fmt), ssd_mm=1000.0)
    np.testing.assert_allclose(m.meta["kernels_as_stored_per_mm2"][0], 4.0 * _gauss(2.5), rtol=1e-12)
    assert "multiplied by 4" in m.meta["kernel_normalisation"]


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("protons", "machine.meta.radiationMode", "'protons'"),
        ("no machine", "machine", "no variable 'machine'"),
        ("no kernel3", "machine.data.kernel(1).kernel3", "missing"),
        ("no SSD", "machine.data.kernel(1).SSD", "missing"),
        ("no kernel", "machine.data.kernel", "struct array"),
        ("betas", "machine.data.betas", "3 values"),
        ("kernelPos", "machine.data.kernelPos", "start at 0"),
        ("kernel length", "machine.data.kernel(2).kernel1", "positions"),
        ("beta equals m", "machine.data", "differ"),
        ("no SAD", "machine.meta.SAD", "missing"),
    ],
)
def test_bad_machines_name_file_and_field(tmp_path, fmt, case, field, words):
    v = _machine_vars()
    data = v["machine"]["data"]
    if case == "protons":
        v = _machine_vars(mode="protons")
    elif case == "no machine":
        v = {"something": 1.0}
    elif case == "no kernel3":
        v = _machine_vars(kernel_fields=("SSD", "kernel1", "kernel2"))
    elif case == "no SSD":
        v = _machine_vars(kernel_fields=("kernel1", "kernel2", "kernel3"))
    elif case == "no kernel":
        del data["kernel"]
    elif case == "betas":
        data["betas"] = np.array([0.3, 0.05])
    elif case == "kernelPos":
        data["kernelPos"] = R_MM + 0.5
    elif case == "kernel length":
        data["kernel"][1]["kernel1"] = _gauss(2.5)[:-1]
    elif case == "beta equals m":
        data["betas"] = np.array([0.3, 0.005, 0.01])
    elif case == "no SAD":
        del v["machine"]["meta"]["SAD"]
    path = write_mat(tmp_path / "machine.mat", v, fmt)
    with pytest.raises(InputError) as info:
        read_matrad_machine(path, ssd_mm=1000.0)
    assert "machine.mat" in str(info.value)
    assert info.value.field == field
    assert words in str(info.value)


# ---------------------------------------------- the MAT-file layer itself
def test_v5_and_v73_give_the_same_tree(tmp_path):
    variables = {
        "s": {"a": 1.5, "text": "héllo", "empty": "", "flag": np.array([True, False]),
              "m": np.arange(6.0).reshape(2, 3), "n": np.zeros((0, 0)),
              "c": cell("x", np.array([1, 2], dtype=np.int32), {"q": 2.0}, np.ones((2, 2, 2)), shape=(2, 2)),
              "arr": StructArray([{"v": 1.0}, {"v": 2.0}, {"v": 3.0}])},
    }
    trees = []
    for fmt in FORMATS:
        tree, notes, _ = load_mat_variables(write_mat(tmp_path / f"t_{fmt}.mat", variables, fmt), ("s", "absent"))
        assert notes == [] and set(tree) == {"s"}
        trees.append(tree["s"])
    for s in trees:
        assert s["text"] == "héllo" and s["empty"] == ""
        np.testing.assert_array_equal(s["m"], np.arange(6.0).reshape(2, 3))
        assert s["flag"].astype(bool).tolist() == [[True, False]]
        assert s["n"].size == 0
        assert isinstance(s["c"], Cell) and s["c"].shape == (2, 2)
        assert s["c"].items[0, 0] == "x" and s["c"].items[1, 0]["q"].item() == 2.0
        np.testing.assert_array_equal(s["c"].items[1, 1], np.ones((2, 2, 2)))
        np.testing.assert_array_equal(s["c"].items[0, 1], [[1, 2]])
        assert [e["v"].item() for e in s["arr"]] == [1.0, 2.0, 3.0]
    assert list(trees[0]) == list(trees[1])  # field order kept


def test_v73_class_objects_are_opaque(tmp_path):
    path = tmp_path / "obj.mat"
    write_v73(path, _phantom_vars())
    with h5py.File(path, "r+") as f:  # replace the PTV objective by a classdef object, as MATLAB stores one
        objectives_cell = f[f["cst"][5, 0]]  # cst{1,6}; the file holds cst transposed
        ds = f.create_dataset("#refs#/object", data=np.array([[3707764736], [2], [1], [1], [1], [1]], dtype=np.uint32))
        ds.attrs["MATLAB_class"] = np.bytes_("DoseObjectives.matRad_SquaredDeviation")
        ds.attrs["MATLAB_object_decode"] = np.int32(3)
        objectives_cell[0, 0] = ds.ref
    tree, _, _ = load_mat_variables(path, ("cst",))
    assert tree["cst"].items[0, 5].items[0, 0] == Opaque("DoseObjectives.matRad_SquaredDeviation")
    p = read_matrad_phantom(path)
    assert p.structure("PTV").meta["matrad_objectives"] == [
        {"class": "DoseObjectives.matRad_SquaredDeviation", "parameters": [], "penalty": None, "decoded": False}
    ]


# ------------------------------------------------------- real matRad files
def _real_data() -> Path:
    folder = os.environ.get("IDS_MATRAD_DATA")
    if not folder:
        pytest.skip("IDS_MATRAD_DATA is not set (folder with matRad phantoms/ and machines/)")
    return Path(folder)


def _phantom_files(root: Path) -> list[Path]:
    files = sorted((root / "phantoms").glob("*.mat")) if (root / "phantoms").is_dir() else []
    if not files:
        pytest.skip(f"no phantoms/*.mat under {root}")
    return files


def _to_writer(v):
    """The reader's tree back into the writer's values (for a v7.3 copy of a real file)."""
    if isinstance(v, dict):
        return {k: _to_writer(x) for k, x in v.items() if not isinstance(x, Opaque)}
    if isinstance(v, list):
        return StructArray(_to_writer(x) for x in v)
    if isinstance(v, Cell):
        out = np.empty(v.shape, dtype=object)
        for idx in np.ndindex(v.shape):
            out[idx] = _to_writer(v.items[idx])
        return out
    return v


def test_real_phantoms(tmp_path):
    for path in _phantom_files(_real_data()):
        p = read_matrad_phantom(path)
        assert p.ct_hu.ndim == 3 and np.isfinite(p.ct_hu).all()
        assert p.structures and all(not s.is_empty for s in p.structures)
        assert p.targets, f"{path.name}: no target"
        for s in p.structures:
            if s.name.upper() in ("BODY", "EXTERNAL", "SKIN"):
                assert s.kind is StructureKind.EXTERNAL
                # the body contour and the CT agree: inside is tissue, outside air
                assert p.ct_hu[s.mask].mean() > -300 and p.ct_hu[~s.mask].mean() < -700
        if path.name == "TG119.mat":
            assert p.grid.shape_zyx == (129, 167, 167)
            assert p.grid.spacing_mm_zyx == (2.5, 3.0, 3.0)
            assert p.structure_names == ("Core", "OuterTarget", "BODY")


def test_real_phantom_v73_copy_reads_the_same(tmp_path):
    path = _phantom_files(_real_data())[0]
    tree, _, _ = load_mat_variables(path, ("ct", "cst"))
    tree["ct"] = {k: v for k, v in tree["ct"].items() if k not in ("dicomMeta",)}
    copy = tmp_path / path.name
    write_v73(copy, {k: _to_writer(v) for k, v in tree.items()})
    a, b = read_matrad_phantom(path), read_matrad_phantom(copy)
    assert a.grid == b.grid
    np.testing.assert_array_equal(a.ct_hu, b.ct_hu)
    assert a.structure_names == b.structure_names
    for sa, sb in zip(a.structures, b.structures):
        np.testing.assert_array_equal(sa.mask, sb.mask)
        assert sa.meta == sb.meta


def test_real_photon_machine(tmp_path):
    path = _real_data() / "machines" / "photons_Generic.mat"
    if not path.is_file():
        pytest.skip(f"no {path}")
    m = read_matrad_machine(path)
    assert m.sad_mm == 1000.0 and m.energy_mv == 6.0
    assert m.meta["kernel_ssd_mm"] == 950.0
    assert m.kernels_per_mm2.shape == (3, m.kernel_radius_mm.size)
    assert m.meta["radiation_mode"] == "photons"
    for other in ("protons_Generic.mat", "carbon_Generic.mat"):
        if (path.parent / other).is_file():
            with pytest.raises(InputError, match="radiationMode"):
                read_matrad_machine(path.parent / other)
    tree, _, _ = load_mat_variables(path, ("machine",))
    copy = tmp_path / path.name
    write_v73(copy, {"machine": _to_writer(tree["machine"])})
    m73 = read_matrad_machine(copy)
    np.testing.assert_array_equal(m73.kernels_per_mm2, m.kernels_per_mm2)
    assert (m73.betas_per_mm, m73.attenuation_per_mm, m73.name) == (m.betas_per_mm, m.attenuation_per_mm, m.name)


@pytest.mark.parametrize(("field", "bad_value"), [("cubeHU", np.nan), ("cubeHU", np.inf), ("cube", -np.inf)])
def test_non_finite_ct_voxels_are_refused(tmp_path, fmt, field, bad_value):
    """One NaN or inf voxel would make the whole dose NaN: refused, naming the file, field and count."""
    cube = _encoded_cube()
    cube[2, 1, 0] = bad_value
    cube[4, 3, 2] = bad_value
    if field == "cube":
        v = _phantom_vars(ct_changes={"cube": cell(cube)}, drop_ct=("cubeHU",))
    else:
        v = _phantom_vars(ct_changes={"cubeHU": cell(cube)})
    err = _bad(tmp_path, fmt, v)
    assert err.field == f"ct.{field}"
    assert f"2 of {NY * NX * NZ} voxels are not finite" in str(err)
    assert "[y x z] = [3 2 1]" in str(err)
