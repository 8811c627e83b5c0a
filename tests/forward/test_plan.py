"""Plans and the plan book: operations, the plan ID, saving and loading."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from ids_engine.deliver import Aperture
from ids_engine.model import Beam, FluenceGrid, default_mlc
from ids_engine.planning import (
    BeamField, DoseToNormalisation, DoseToPoints, MonitorUnits, Plan, PlanBook, PlanBookError, PointRef,
)

BEAMS = (Beam(name="AP", gantry_deg=0), Beam(name="PA", gantry_deg=180))


def test_book_create_copy_rename_delete_select():
    book = PlanBook({"phantom": "water"})
    a = book.create("a", BEAMS)
    assert book.selected == "a" and a.plan_id == 1 and a.fields[0].kind == "open"
    book.update("a", mu=(10, 20))
    b = book.copy("a", "b")
    assert book.selected == "b" and book.names == ("a", "b")
    assert b.mu == (10.0, 20.0) and b.plan_id == book.get("a").plan_id  # same dose, same ID
    book.update("b", mu=(11, 20))  # the copy changes, the original stays
    assert book.get("a").mu == (10.0, 20.0) and book.get("b").mu == (11.0, 20.0)
    book.rename("b", "c")
    assert book.names == ("a", "c") and book.selected == "c" and book.get("c").name == "c"
    assert book.get("c").plan_id == 3  # rename does not change the dose
    book.select("a")
    assert book.current.name == "a"
    book.delete("a")
    assert book.names == ("c",) and book.selected == "c"
    with pytest.raises(PlanBookError, match="exists already"):
        book.copy("c", "c")
    with pytest.raises(PlanBookError, match=r"no plan 'zz'; plans: c"):
        book.get("zz")
    with pytest.raises(PlanBookError, match="rename"):
        book.update("c", name="d")


def test_plan_id_increments_only_on_dose_affecting_changes():
    p = Plan("p", BEAMS, mu=(10, 10))
    assert p.changed(mu=(10, 10)).plan_id == 1  # nothing changed
    assert p.changed(name="q").plan_id == 1  # a name is not dose
    p2 = p.with_mu((10, 11))
    assert p2.plan_id == 2
    assert p2.changed(prescription=MonitorUnits((10, 11))).plan_id == 3
    assert p2.changed(normalisation=PointRef("dmax", 1)).plan_id == 3
    assert p2.add_beam(Beam(name="LL", gantry_deg=90)).plan_id == 3
    assert p2.remove_beam("PA").plan_id == 3
    f = BeamField((-20, 20), (-20, 20))
    assert p2.changed(fields=(f, p2.fields[1])).plan_id == 3
    # An equal field built anew is the same dose: no increment.
    assert p2.changed(fields=(BeamField(), BeamField())).plan_id == 2
    with pytest.raises(ValueError, match="plan_id"):
        p.changed(plan_id=7)


def test_plan_id_is_incremented_in_exactly_one_place():
    """Only Plan.changed computes a new plan ID (``plan_id=self.plan_id + 1``); no other code
    in ids_engine sets a plan's plan_id from arithmetic."""
    root = Path(__file__).resolve().parents[2] / "ids_engine" / "planning"
    hits = []
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "plan_id" and isinstance(node.value, ast.BinOp):
                hits.append((path.name, node.lineno))
    assert len(hits) == 1 and hits[0][0] == "_plan.py"


def test_plan_refuses_bad_values():
    with pytest.raises(ValueError, match="duplicate beam names"):
        Plan("p", (BEAMS[0], BEAMS[0]))
    with pytest.raises(ValueError, match="3 MU values for 2 beams"):
        Plan("p", BEAMS, mu=(1, 2, 3))
    with pytest.raises(ValueError, match=r"mu\[1\]"):
        Plan("p", BEAMS, mu=(1, -2))
    with pytest.raises(ValueError, match="jaw_x_mm"):
        BeamField((10, -10), (-5, 5))
    with pytest.raises(ValueError, match="no beam 'LL'"):
        Plan("p", BEAMS).beam_index("LL")


def test_open_field_fluence_is_one_mu_inside_the_jaws():
    grid = FluenceGrid.centred((100.0, 100.0), 1.0)
    fl = BeamField((-20.0, 30.0), (-10.0, 10.0)).fluence(grid)
    u, v = np.meshgrid(grid.u_mm(), grid.v_mm())
    inside = (u > -19.5) & (u < 29.5) & (v > -9.5) & (v < 9.5)
    outside = (u < -20.5) | (u > 30.5) | (v < -10.5) | (v > 10.5)
    assert np.allclose(fl[inside], 1.0) and np.allclose(fl[outside], 0.0)
    assert fl.sum() == pytest.approx(50 * 20, rel=1e-6)  # area in cells of 1 mm^2


def test_save_and_load_round_trip(tmp_path):
    mlc = default_mlc()
    n = mlc.n_pairs
    ap = Aperture(np.full(n, -15.0), np.linspace(5, 25, n), (-20.0, 30.0), (-40.0, 40.0))
    fg = FluenceGrid((11, 13), 2.0, (-12.0, -10.0))
    fmap = np.arange(11 * 13, dtype=np.float32).reshape(11, 13) / 100
    beams = (Beam(name="A", gantry_deg=30, isocentre_mm_xyz=(1, 2, 3)),
             Beam(name="B", gantry_deg=200, couch_deg=10, fluence_grid=fg), Beam(name="C", collimator_deg=15))
    book = PlanBook({"phantom": "water", "resolution": "coarse"})
    book.create("one", beams, (BeamField(aperture=ap), BeamField(fluence_per_mu=fmap), BeamField((-5, 5), (-7, 9))),
                mu=(12, 34, 56), prescription=DoseToNormalisation(2.0, (1, 2, 0.5), percent=95,
                                                                   points=(PointRef("dmax", 1), None, PointRef("point", label="P1"))),
                normalisation=PointRef("point", label="P1"))
    book.update("one", mu=(12, 35, 56))
    book.copy("one", "two")
    book.update("two", prescription=DoseToPoints((1.0, 0.5, 0.25)))
    book.select("one")
    book.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planbook.json", "planbook.npz"]  # no temporary files
    again = PlanBook.load(tmp_path)
    assert again.names == ("one", "two") and again.selected == "one" and again.case == book.case
    for name in again.names:
        a, b = book.get(name), again.get(name)
        assert (a.plan_id, a.mu, a.beams, a.prescription, a.normalisation) == (b.plan_id, b.mu, b.beams, b.prescription,
                                                                               b.normalisation)
        assert [f.key() for f in a.fields] == [f.key() for f in b.fields]
    f0 = again.get("one").fields[0].aperture
    assert np.array_equal(f0.leaf_x2_mm, ap.leaf_x2_mm) and f0.jaw_x_mm == (-20.0, 30.0)
    assert np.array_equal(again.get("one").fields[1].fluence_per_mu, fmap)


def test_load_names_the_problem(tmp_path):
    (tmp_path / "planbook.json").write_text("{not json")
    with pytest.raises(PlanBookError, match="planbook.json: not JSON"):
        PlanBook.load(tmp_path)
    book = PlanBook()
    book.create("p", BEAMS[:1], (BeamField(fluence_per_mu=np.ones((3, 3))),))
    book.save(tmp_path)
    (tmp_path / "planbook.npz").unlink()
    with pytest.raises(PlanBookError, match=r"plans\[0\]: array 'p0_b0_fluence' is missing from planbook.npz"):
        PlanBook.load(tmp_path)
    doc = {"format": "ids-engine plan book", "version": 1, "selected": None,
           "plans": [{"name": "x", "plan_id": 1, "beams": [{"name": "a", "gantry_deg": "left"}], "fields": [{}],
                      "mu": [0], "normalisation": {"kind": "isocentre", "beam": 0}}]}
    (tmp_path / "planbook.json").write_text(json.dumps(doc))
    with pytest.raises(PlanBookError, match=r"plans\[0\]"):
        PlanBook.load(tmp_path)
