"""``ids planbook``: a saved plan book's plans and beams from the command line."""

from __future__ import annotations

import json

import pytest

from ids_engine.cli import main
from ids_engine.model import Beam
from ids_engine.planning import BeamField, PlanBook


@pytest.fixture()
def book_dir(tmp_path):
    book = PlanBook({"phantom": "water", "resolution": "coarse"})
    book.create("A", [Beam("AP", gantry_deg=0.0), Beam("LL", gantry_deg=90.0, collimator_deg=10.0)],
                [BeamField((-30, 30), (-20, 20)), BeamField((-40, 10), (-20, 20))], mu=(100.0, 50.0))
    book.save(tmp_path / "book")
    return tmp_path / "book"


def test_list_copy_rename_delete_select(book_dir, capsys):
    assert main(["planbook", str(book_dir), "list"]) == 0
    assert "* A" in capsys.readouterr().out
    assert main(["planbook", str(book_dir), "copy", "A", "B"]) == 0
    assert main(["planbook", str(book_dir), "rename", "B", "C"]) == 0
    assert main(["planbook", str(book_dir), "select", "A"]) == 0
    book = PlanBook.load(book_dir)
    assert book.names == ("A", "C") and book.selected == "A"
    # A copy keeps the plan ID (same dose); the source is unchanged.
    assert book.get("C").plan_id == book.get("A").plan_id
    assert main(["planbook", str(book_dir), "delete", "C"]) == 0
    assert PlanBook.load(book_dir).names == ("A",)


def test_opposed_beam_mirrors_the_field_and_raises_the_plan_id(book_dir, capsys):
    before = PlanBook.load(book_dir).get("A")
    assert main(["planbook", str(book_dir), "opposed", "A", "LL"]) == 0
    after = PlanBook.load(book_dir).get("A")
    assert after.plan_id == before.plan_id + 1
    opp, field = after.beams[-1], after.fields[-1]
    assert opp.name == "LL opp" and opp.gantry_deg == 270.0 and opp.collimator_deg == 350.0
    assert field.jaw_x_mm == (-10.0, 40.0) and field.jaw_y_mm == (-20.0, 20.0)
    assert after.mu[-1] == 50.0
    # Beams by number, as 'beams' lists them.
    assert main(["planbook", str(book_dir), "delete-beam", "A", "3"]) == 0
    assert [b.name for b in PlanBook.load(book_dir).get("A").beams] == ["AP", "LL"]


def test_errors_name_the_plan_or_beam_and_change_nothing(book_dir, capsys):
    text = (book_dir / "planbook.json").read_text()
    assert main(["planbook", str(book_dir), "delete", "nope"]) == 2
    assert "no plan 'nope'" in capsys.readouterr().err
    assert main(["planbook", str(book_dir), "opposed", "A", "9"]) == 2
    assert "plan 'A'" in capsys.readouterr().err
    assert main(["planbook", str(book_dir), "copy", "A"]) == 2
    assert "takes SOURCE NEW_NAME" in capsys.readouterr().err
    assert main(["planbook", str(book_dir), "copy", "A", "A"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert (book_dir / "planbook.json").read_text() == text
    assert json.loads(text)["selected"] == "A"
    assert main(["planbook", str(book_dir / "missing"), "list"]) == 2
