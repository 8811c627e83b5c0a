"""Protocol files (TOML) and the matRad cst converter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ids_engine.io import InputError, read_matrad_phantom
from ids_engine.optimise import (
    MaxDose,
    MaxDVH,
    MaxEUD,
    MaxMeanDose,
    MinDose,
    MinDVH,
    MinEUD,
    MinMeanDose,
    Protocol,
    UniformDose,
    dvh_goal,
    goals_from_matrad,
    protocol_from_matrad,
    read_protocol,
)
from tests.io.test_matrad import _phantom_vars, write_mat

TG119 = """
name = "TG-119 C-shape, harder goals"
description = "AAPM TG-119 (2009)"

[[goal]]
structure = "PTV"
dvh = "D95 >= 50 Gy"
importance = 100

[[goal]]
structure = "PTV"
kind = "max_dvh"
dose_gy = 55
volume_pct = 10
constraint = true

[[goal]]
structure = "Core"
dvh = "D10% <= 10 Gy"
importance = 50
name = "core sparing"

[[goal]]
structure = "Core"
kind = "max_eud"
eud_gy = 8.5
a = 4

[[goal]]
structure = "Body"
kind = "max_dose"
dose_gy = 60
importance = 1.5
"""


def _write(tmp_path, text, name="protocol.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_protocol(tmp_path):
    p = read_protocol(_write(tmp_path, TG119))
    assert p.name == "TG-119 C-shape, harder goals" and p.description == "AAPM TG-119 (2009)"
    assert p.goals == (
        MinDVH("PTV", 50.0, 95.0, importance=100.0),
        MaxDVH("PTV", 55.0, 10.0, constraint=True),
        MaxDVH("Core", 10.0, 10.0, importance=50.0, name="core sparing"),
        MaxEUD("Core", 8.5, 4.0),
        MaxDose("Body", 60.0, importance=1.5),
    )
    assert p.structures == ("PTV", "Core", "Body")
    assert len(p.constraints) == 1 and len(p.objectives) == 4
    assert p.goals[2].label == "core sparing"


@pytest.mark.parametrize(
    ("text", "entry", "field", "message"),
    [
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\n', "goal 1 (PTV, min_dose)", "dose_gy", "required"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\n'
         '[[goal]]\nstructure = "Cord"\nkind = "max_dvh"\ndose_gy = 45\nvolume_pct = 120\n',
         "goal 2 (Cord, max_dvh)", "volume_pct", "must be <= 100"),
        ('[[goal]]\nstructure = "PTV"\nkind = "mindose"\ndose_gy = 50\n', "goal 1 (PTV, mindose)", "kind",
         "unknown kind"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose = 50\n', "goal 1 (PTV, min_dose)", "dose",
         "unknown key"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = "50"\n', "goal 1 (PTV, min_dose)", "dose_gy",
         "must be a number"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\nimportance = -1\n',
         "goal 1 (PTV, min_dose)", "importance", "positive"),
        ('[[goal]]\nstructure = "PTV"\nkind = "uniform_dose"\ndose_gy = 50\nconstraint = true\n',
         "goal 1 (PTV, uniform_dose)", "constraint", "only be an objective"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\nconstraint = "yes"\n',
         "goal 1 (PTV, min_dose)", "constraint", "true or false"),
        ('[[goal]]\nkind = "min_dose"\ndose_gy = 50\n', "goal 1 (?, min_dose)", "structure", "required"),
        ('[[goal]]\nstructure = "PTV"\ndvh = "D95 > 50"\n', "goal 1 (PTV, D95 > 50)", "dvh", "not a DVH point"),
        ('[[goal]]\nstructure = "PTV"\ndvh = "D95 >= 50 Gy"\nkind = "min_dvh"\n', "goal 1 (PTV, min_dvh)",
         "dvh", "either kind"),
        ('[[goal]]\nstructure = "PTV"\n', "goal 1 (PTV, ?)", "kind", "required"),
    ],
)
def test_reader_errors_name_file_entry_and_field(tmp_path, text, entry, field, message):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as info:
        read_protocol(path)
    err = info.value
    assert err.path == str(path)
    assert err.field == f"{entry}: {field}"
    assert message in err.message
    assert str(err).startswith(f"{path}: {entry}: {field}: ")


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('name = "x"\n', "goal", "no goals"),
        ('goal = 3\n', "goal", "array of tables"),
        ('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\n[extra]\n', "extra", "unknown top-level"),
        ('name = 5\n[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\n', "name", "must be a string"),
    ],
)
def test_reader_file_level_errors(tmp_path, text, field, message):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=message) as info:
        read_protocol(path)
    assert info.value.path == str(path) and info.value.field == field


def test_reader_not_toml_and_missing(tmp_path):
    path = _write(tmp_path, "[[goal]\nstructure = ")
    with pytest.raises(InputError, match="not valid TOML") as info:
        read_protocol(path)
    assert info.value.path == str(path)
    with pytest.raises(InputError, match="cannot read"):
        read_protocol(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("D95 >= 50 Gy", MinDVH("PTV", 50.0, 95.0)),
        ("D95% >= 50 Gy", MinDVH("PTV", 50.0, 95.0)),
        ("D10 <= 55 Gy", MaxDVH("PTV", 55.0, 10.0)),
        ("V20Gy <= 30 %", MaxDVH("PTV", 20.0, 30.0)),
        ("v50gy >= 95%", MinDVH("PTV", 50.0, 95.0)),
        ("V 19.5 Gy <= 2.5 %", MaxDVH("PTV", 19.5, 2.5)),
    ],
)
def test_dvh_notation(text, expected):
    assert dvh_goal("PTV", text) == expected


def test_dvh_notation_options_and_errors():
    assert dvh_goal("PTV", "D95 >= 50 Gy", importance=5.0, constraint=True) == MinDVH(
        "PTV", 50.0, 95.0, importance=5.0, constraint=True)
    for bad in ("D95 = 50 Gy", "V20 <= 30 %", "D95 >= 50", "Dmean <= 20 Gy"):
        with pytest.raises(ValueError, match="not a DVH point"):
            dvh_goal("PTV", bad)


# ------------------------------------------------------------------- matRad
def test_matrad_objectives():
    entries = [
        {"class": "DoseObjectives.matRad_SquaredDeviation", "parameters": [60.0], "penalty": 1000.0},
        {"class": "DoseObjectives.matRad_SquaredOverdosing", "parameters": [45.0], "penalty": 300.0},
        {"class": "DoseObjectives.matRad_SquaredUnderdosing", "parameters": [57.0], "penalty": 50.0},
        {"class": "DoseObjectives.matRad_MeanDose", "parameters": [12.0, "Linear"], "penalty": 10.0},
        {"class": "DoseObjectives.matRad_EUD", "parameters": [[20.0, 3.5]], "penalty": 5.0},
        {"class": "DoseObjectives.matRad_EUD", "parameters": [55.0, -10.0], "penalty": 5.0},
        {"class": "DoseObjectives.matRad_MinDVH", "parameters": [50.0, 95.0], "penalty": 100.0},
        {"class": "matRad_MaxDVH", "parameters": [20.0, 30.0], "penalty": None},
    ]
    assert goals_from_matrad("S", entries) == (
        UniformDose("S", 60.0, importance=1000.0),
        MaxDose("S", 45.0, importance=300.0),
        MinDose("S", 57.0, importance=50.0),
        MaxMeanDose("S", 12.0, importance=10.0),
        MaxEUD("S", 20.0, 3.5, importance=5.0),
        MinEUD("S", 55.0, -10.0, importance=5.0),
        MinDVH("S", 50.0, 95.0, importance=100.0),
        MaxDVH("S", 20.0, 30.0),
    )


def test_matrad_constraints():
    inf = float("inf")
    entries = [
        {"class": "DoseConstraints.matRad_MinMaxDose", "parameters": [0.0, 45.0, 1.0], "penalty": 1.0},
        {"class": "DoseConstraints.matRad_MinMaxDose", "parameters": [50.0, 66.0, 1.0], "penalty": 1.0},
        {"class": "DoseConstraints.matRad_MinMaxMeanDose", "parameters": [0.0, 20.0], "penalty": 1.0},
        {"class": "DoseConstraints.matRad_MinMaxEUD", "parameters": [5.0, 0.0, 25.0], "penalty": 1.0},
        # The entry the matRad reader's own test fixture carries:
        {"class": "DoseConstraints.matRad_MinMaxDVH", "parameters": [30.0, 0.0, 50.0], "penalty": 1.0},
        {"class": "DoseConstraints.matRad_MinMaxDVH", "parameters": [48.0, 98.0, 100.0], "penalty": 1.0},
        {"class": "DoseConstraints.matRad_MinMaxMeanDose", "parameters": [10.0, inf], "penalty": 1.0},
    ]
    c = {"constraint": True}
    assert goals_from_matrad("S", entries) == (
        MaxDose("S", 45.0, **c),
        MinDose("S", 50.0, **c),
        MaxDose("S", 66.0, **c),
        MaxMeanDose("S", 20.0, **c),
        MaxEUD("S", 25.0, 5.0, **c),
        MaxDVH("S", 30.0, 50.0, **c),
        MinDVH("S", 48.0, 98.0, **c),
        MinMeanDose("S", 10.0, **c),
    )


def test_matrad_before_2019_type_strings():
    entries = [
        {"class": "square underdosing", "parameters": [60.0], "penalty": 800.0},
        {"class": "max DVH", "parameters": [30.0, 40.0], "penalty": 10.0},
        {"class": "max dose constraint", "parameters": [50.0], "penalty": 1.0},
        {"class": "min mean dose constraint", "parameters": [5.0], "penalty": 1.0},
    ]
    assert goals_from_matrad("S", entries) == (
        MinDose("S", 60.0, importance=800.0),
        MaxDVH("S", 30.0, 40.0, importance=10.0),
        MaxDose("S", 50.0, constraint=True),
        MinMeanDose("S", 5.0, constraint=True),
    )


def test_matrad_errors_name_structure_entry_and_class():
    with pytest.raises(ValueError, match=r"cst 'Cord' objective 2 \(DoseObjectives.matRad_Foo\): no goal"):
        goals_from_matrad("Cord", [{"class": "DoseObjectives.matRad_SquaredOverdosing", "parameters": [45.0]},
                                   {"class": "DoseObjectives.matRad_Foo", "parameters": [1.0]}])
    with pytest.raises(ValueError, match=r"objective 1 \(DoseObjectives.matRad_MinDVH\): needs 2"):
        goals_from_matrad("PTV", [{"class": "DoseObjectives.matRad_MinDVH", "parameters": [50.0]}])
    with pytest.raises(ValueError, match=r"objective 1 .*MaxDVH.volume_pct must be <= 100"):
        goals_from_matrad("PTV", [{"class": "DoseObjectives.matRad_MaxDVH", "parameters": [50.0, 150.0]}])
    with pytest.raises(ValueError, match="without its parameters"):
        goals_from_matrad("PTV", [{"class": "DoseObjectives.matRad_SquaredDeviation", "parameters": [],
                                   "penalty": None, "decoded": False}])


def test_protocol_from_matrad_structures():
    structures = [
        SimpleNamespace(name="PTV", meta={"matrad_objectives": [
            {"class": "DoseObjectives.matRad_SquaredDeviation", "parameters": [60.0], "penalty": 1000.0}]}),
        SimpleNamespace(name="Cord", meta={"matrad_objectives": [
            {"class": "DoseObjectives.matRad_SquaredOverdosing", "parameters": [45.0], "penalty": 300.0},
            {"class": "DoseObjectives.matRad_Unknown", "parameters": [1.0], "penalty": 1.0}]}),
        SimpleNamespace(name="Body", meta={"matrad_objectives": []}),
    ]
    with pytest.raises(ValueError, match="cst 'Cord' objective 2"):
        protocol_from_matrad(structures)
    p = protocol_from_matrad(structures, skip_unknown=True, name="from matRad")
    assert isinstance(p, Protocol) and p.name == "from matRad"
    assert p.goals == (UniformDose("PTV", 60.0, importance=1000.0), MaxDose("Cord", 45.0, importance=300.0))
    assert len(p.notes) == 1 and "cst 'Cord' objective 2" in p.notes[0]
    assert protocol_from_matrad({"PTV": structures[0].meta["matrad_objectives"]}).goals == p.goals[:1]


def test_protocol_from_a_matrad_file(tmp_path):
    """Through the matRad reader: the cst of its own test phantom."""
    patient = read_matrad_phantom(write_mat(tmp_path / "box.mat", _phantom_vars(), "v5"))
    p = protocol_from_matrad(patient.structures)
    assert p.goals == (
        UniformDose("PTV", 60.0, importance=1000.0),
        MaxDose("Cord", 45.0, importance=300.0),
        MaxDVH("Cord", 30.0, 50.0, constraint=True),
    )
