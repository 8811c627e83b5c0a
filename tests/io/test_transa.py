"""Elekta Transa-style export (seed 001): the configuration file in the seed's format, the
patient ID within 14 characters, overflow plans and IDs as the seed's example says, only
energy, field shape, jaws, collimator angle and leaf positions written."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.deliver import Aperture, DeliverablePlan, Segment, SequencedBeam
from ids_engine.io import (
    TRANSA_CONFIG_NAME,
    InputError,
    TransaConfig,
    find_transa_config,
    read_transa_config,
    read_transa_plan,
    transa_patient_id,
    write_transa,
)
from ids_engine.model import Beam, default_mlc

# The seed's example, as printed (the directory line is a bare path; see the module docstring).
SEED_CONFIG = """\
// Directory where plans are to be exported to.   The program
// first looks into the machine's beam data directory.
// If there it is read there.  If not found it looks into the
// program resources directory.
{directory}
/* file format version this file */ 1



/* limit of number of plans per patient directory */ 3
/* limit of number of beams per plan */ 8
/* name of machine to put in the file */MLC_01
/* number of characters of patient dept. id # to use */ 7
/* number of characters of last name of patient to use */ 3
/* number of characters of first name of patient to use */ 0
/* number of characters of middle name of patient to use */ 0
"""


def config_file(tmp_path, directory="", text=SEED_CONFIG):
    path = tmp_path / TRANSA_CONFIG_NAME
    path.write_text(text.format(directory=directory))
    return path


def plan_of(n_beams: int, segments_per_beam: int = 1) -> DeliverablePlan:
    mlc = default_mlc()
    beams = []
    for b in range(n_beams):
        segs = []
        for k in range(segments_per_beam):
            x1 = np.full(mlc.n_pairs, -20.0 + k)
            x2 = np.full(mlc.n_pairs, 30.0 - b % 5)
            centres = mlc.leaf_centres_mm()
            closed = np.abs(centres) > 25
            x1[closed] = 0.0
            x2[closed] = 0.0
            segs.append(Segment(Aperture(x1, x2, (-20.0 + k, 30.0 - b % 5), (-25.0, 25.0)), 10.0 + k))
        beams.append(SequencedBeam(Beam(f"B{b + 1}", gantry_deg=10 * b, collimator_deg=5 * b, energy_mv=6 + 4 * (b % 2)),
                                   mlc, tuple(segs)))
    return DeliverablePlan("t", tuple(beams), 60.0, 30)


def test_the_seed_example_configuration_is_read(tmp_path):
    cfg = read_transa_config(config_file(tmp_path, "/home/export.d/patients"))
    assert cfg == TransaConfig(plans_per_patient=3, beams_per_plan=8, machine_name="MLC_01", department_chars=7,
                               last_name_chars=3, first_name_chars=0, middle_name_chars=0,
                               directory="/home/export.d/patients", version=1, source=cfg.source)
    # The directory may also be a /* */ setting, or absent.
    text = SEED_CONFIG.replace("{directory}", "/* directory where plans are to be exported to */ /srv/x")
    assert read_transa_config(config_file(tmp_path, text=text)).directory == "/srv/x"
    assert read_transa_config(config_file(tmp_path, "")).directory == ""
    assert read_transa_config(config_file(tmp_path, "out/patients")).directory == str(tmp_path / "out/patients")


def test_the_config_is_found_in_the_machine_directory_first(tmp_path):
    machine, resources = tmp_path / "machine", tmp_path / "resources"
    machine.mkdir()
    resources.mkdir()
    assert find_transa_config(machine, resources) is None
    (resources / TRANSA_CONFIG_NAME).write_text("x")
    assert find_transa_config(machine, resources) == resources / TRANSA_CONFIG_NAME
    (machine / TRANSA_CONFIG_NAME).write_text("x")
    assert find_transa_config(machine, resources) == machine / TRANSA_CONFIG_NAME


@pytest.mark.parametrize("edit, where, message", [
    (lambda t: t.replace("/* limit of number of beams per plan */ 8", "/* beams allowed */ 8"), "line 11",
     "unknown setting"),
    (lambda t: t.replace("this file */ 1", "this file */ 2"), "line 6", "version 2"),
    (lambda t: t.replace("per plan */ 8", "per plan */ eight"), "line 11", "whole number"),
    (lambda t: t.replace("per plan */ 8", "per plan */ 0"), "line 11", "at least 1"),
    (lambda t: t.replace("/* number of characters of middle name of patient to use */ 0\n", ""), None,
     "middle_name_chars"),
    (lambda t: t + "/* limit of number of beams per plan */ 9\n", "line 17", "set twice"),
])
def test_bad_configurations_name_the_file_and_line(tmp_path, edit, where, message):
    path = config_file(tmp_path, text=edit(SEED_CONFIG.format(directory="/x")))
    with pytest.raises(InputError, match=message) as err:
        read_transa_config(path)
    assert err.value.path == str(path) and err.value.field == where


def test_patient_id_follows_the_seed():
    cfg = TransaConfig()  # the seed's numbers: 7 department characters, 3 of the last name
    assert transa_patient_id(cfg, department_number="1234567890", last_name="Smithson") == "1234567SMI"
    assert transa_patient_id(cfg, department_number="12-345.67 89", last_name="O'Neil") == "1234567ONE"
    wide = TransaConfig(department_chars=10, last_name_chars=20, first_name_chars=20, middle_name_chars=20)
    base = transa_patient_id(wide, department_number="1234567890", last_name="Smith", first_name="Ann")
    assert base == "1234567890SM" and len(base) == 12  # "only 12 characters are actually used"
    assert transa_patient_id(wide, department_number="1234567890", last_name="Smith", number=2) == "1234567890SM2"
    assert len(transa_patient_id(wide, department_number="1234567890", last_name="Smith", number=99)) == 14
    with pytest.raises(ValueError, match="exceed 14"):
        transa_patient_id(wide, department_number="1234567890", last_name="Smith", number=100)
    with pytest.raises(ValueError, match="empty"):
        transa_patient_id(cfg, department_number="", last_name="")


def test_26_beams_overflow_into_a_second_patient_id(tmp_path):
    cfg = read_transa_config(config_file(tmp_path, str(tmp_path / "export")))
    files = write_transa(plan_of(26), cfg, department_number="1234567", last_name="Smith")
    rel = [str(p.relative_to(tmp_path / "export")) for p in files]
    assert rel == ["1234567SMI/PLAN1.TXT", "1234567SMI/PLAN2.TXT", "1234567SMI/PLAN3.TXT", "1234567SMI2/PLAN1.TXT"]
    docs = [read_transa_plan(p) for p in files]
    assert [len(d["fields"]) for d in docs] == [8, 8, 8, 2]
    assert [d["n_fields"] for d in docs] == ["8", "8", "8", "2"]
    assert [d["patient_id"] for d in docs] == ["1234567SMI"] * 3 + ["1234567SMI2"]
    assert all(d["machine"] == "MLC_01" for d in docs)
    assert [f["name"] for f in docs[3]["fields"]] == ["B25", "B26"]


def test_segments_are_fields_and_only_the_seeds_quantities_are_written(tmp_path):
    plan = plan_of(2, segments_per_beam=3)
    files = write_transa(plan, TransaConfig(), directory=tmp_path, department_number="42", last_name="Lee")
    text = files[0].read_text()
    keys = {line.split("=")[0] for line in text.splitlines() if line and not line.startswith("//")}
    assert keys == {"MACHINE", "PATIENT_ID", "PLAN", "FIELDS", "FIELD", "NAME", "ENERGY_MV", "COLLIMATOR_DEG",
                    "JAW_X_MM", "JAW_Y_MM", "LEAF_PAIRS", "LEAF", "SHAPE", "END_FIELD"}
    assert "MU" not in text.replace("_MM", "") and "GANTRY" not in text
    doc = read_transa_plan(files[0])
    assert [f["name"] for f in doc["fields"]] == ["B1 S1", "B1 S2", "B1 S3", "B2 S1", "B2 S2", "B2 S3"]
    for f, (sb, seg) in zip(doc["fields"], [(sb, s) for sb in plan.beams for s in sb.segments]):
        assert f["energy_mv"] == sb.beam.energy_mv and f["collimator_deg"] == sb.beam.collimator_deg
        assert f["jaw_x_mm"] == pytest.approx(seg.aperture.jaw_x_mm)
        assert f["leaf_x1_mm"] == pytest.approx(seg.aperture.leaf_x1_mm, abs=0.05)
        assert f["leaf_x2_mm"] == pytest.approx(seg.aperture.leaf_x2_mm, abs=0.05)
        # The field shape encloses the open area: leaves within the jaws, 10 pairs of 5 mm.
        (poly,) = f["shape"]
        x, y = np.array(poly).T
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        width = min(seg.aperture.jaw_x_mm[1], 30) - seg.aperture.jaw_x_mm[0]
        assert area == pytest.approx(width * 50.0)


def test_without_a_directory_the_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no export directory"):
        write_transa(plan_of(1), TransaConfig(), department_number="1", last_name="A")
