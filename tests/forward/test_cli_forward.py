"""``ids autoweight``: the README's worked example (four-field box, four methods) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ids_engine.cli import main
from ids_engine.planning import MonitorUnits, PlanBook

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "forward" / "box.json"


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fw") / "box"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["autoweight", str(EXAMPLE), "--out", str(out)])
    return rc, out, buf.getvalue()


def test_worked_example_prints_the_comparison(example_run):
    rc, out, text = example_run
    assert rc == 0
    for m in ("simplex", "cimmino", "downhill", "annealing", "simplex, RING max"):
        assert f"\n{m}" in text
    assert "MU AP  MU LL  MU PA  MU RL  PTV min Gy  PTV max Gy  BODY max Gy  RING max Gy" in text
    assert "binary search on the RING upper limit: 2 Gy feasible, 1 Gy infeasible, 1.5 Gy feasible" in text
    comp = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in comp["rows"]}
    ap, ll, pa, rl = rows["simplex"]["mu"]
    assert ll == rl == 0 and ap > 100 and pa > 100  # the seed's remark on the simplex
    ring_row = next(r for k, r in rows.items() if k.startswith("simplex, RING"))
    assert min(ring_row["mu"][1], ring_row["mu"][3]) > 50
    assert ring_row["volumes"]["RING"]["max_gy"] < rows["simplex"]["volumes"]["RING"]["max_gy"]
    for r in comp["rows"]:
        assert r["volumes"]["PTV"]["min_gy"] > 1.97 and all(float(m).is_integer() for m in r["mu"])


def test_worked_example_writes_the_plan_book_and_summaries(example_run):
    _, out, _ = example_run
    book = PlanBook.load(out)
    assert book.names == ("box", "box-simplex", "box-cimmino", "box-downhill", "box-annealing", "box-simplex-RING")
    assert book.selected == "box"
    base = book.get("box")
    assert base.plan_id == 2 and base.mu == (66.0, 80.0, 66.0, 80.0)  # the file's prescription, whole MU
    for name in book.names[1:]:
        p = book.get(name)
        assert isinstance(p.prescription, MonitorUnits) and p.mu == p.prescription.mu
        md = (out / f"physics_{name}_id{p.plan_id}.md").read_text()
        assert f"plan {name}, plan ID {p.plan_id}" in md
    assert (out / "physics_box_id2.html").exists() and (out / "comparison.md").exists()


def test_errors_name_the_file_and_the_field(tmp_path, capsys):
    doc = json.loads(EXAMPLE.read_text())
    doc["plan"]["beams"][1]["gantry"] = 90
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["autoweight", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.json: plan.beams[1]: unknown field(s) ['gantry']" in err
    doc = json.loads(EXAMPLE.read_text())
    doc["autoweight"]["volumes"][0]["name"] = "GTV"
    bad.write_text(json.dumps(doc))
    assert main(["autoweight", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "autoweight.volumes[0]: no structure 'GTV'; structures: BODY, PTV, RING" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["autoweight", str(EXAMPLE), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_infeasible_simplex_is_reported(tmp_path, capsys):
    doc = json.loads(EXAMPLE.read_text())
    doc["case"]["size_mm"] = [200, 160, 100]
    doc["autoweight"]["volumes"].append({"name": "RING", "role": "oar", "max_gy": 0.2, "importance": 0})
    doc["autoweight"].pop("search_upper")
    doc["plan"].pop("prescription")
    f = tmp_path / "tight.json"
    f.write_text(json.dumps(doc))
    rc = main(["autoweight", str(f), "--method", "simplex", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 1 and "simplex: no feasible solution" in out and "RING maximum 0.2 Gy (needs raising by" in out
