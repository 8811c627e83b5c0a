"""``ids autoweight``: the README's worked example (four-field box, four methods) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
        rc = main(["autoweight", str(EXAMPLE), "--out", str(out), "--pdf"])
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
    for name in book.names:  # --pdf: every summary as PDF too
        pdf = (out / f"physics_{name}_id{book.get(name).plan_id}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and f"plan ID {book.get(name).plan_id}".encode() in pdf


def test_planbook_dvh_of_several_plans(example_run, tmp_path, capsys):
    from ids_engine.cli_planbook import book_patient
    from ids_engine.evaluation import exact_dvh
    from ids_engine.planning import BeamDoses

    _, out, _ = example_run
    book = PlanBook.load(out)
    rc = main(["planbook", str(out), "dvh", "box-simplex", "box-cimmino", "--structures", "PTV,RING",
               "--volume", "cc", "--out", str(tmp_path / "dvh")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "dvh" / "dvh.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / "dvh" / "dvh.json").read_text())
    labels = [f"{n} (plan ID {book.get(n).plan_id})" for n in ("box-simplex", "box-cimmino")]
    assert [(c["plan"], c["structure"]) for c in doc["curves"]] == [(p, s) for p in labels for s in ("PTV", "RING")]
    assert doc["method"] == "exact" and doc["volume"] == "cc"
    # The curves are the exact DVHs of each plan's dose (the case rebuilt from the book).
    patient, label = book_patient(book, out)
    assert label == "phantom water (coarse)"
    plan = book.get("box-cimmino")
    dose = BeamDoses(patient, plan).dose(plan.mu)
    want = exact_dvh("RING", dose, patient.structure("RING").mask, patient.grid, bin_gy=doc["bin_gy"])
    got = doc["curves"][3]
    assert got["volume_pct"] == pytest.approx(list(100 * want.volume_fraction), abs=1e-3)
    # The simplex takes the AP/PA pair: its RING gets more dose than Cimmino's four fields.
    assert max(c["dose_gy"][np.flatnonzero(np.array(c["volume_pct"]) > 0)[-1]] for c in doc["curves"]
               if c["plan"] == labels[0] and c["structure"] == "RING") > \
        max(c["dose_gy"][np.flatnonzero(np.array(c["volume_pct"]) > 0)[-1]] for c in doc["curves"]
            if c["plan"] == labels[1] and c["structure"] == "RING")
    # Errors name the plan or the folder; nothing is written.
    assert main(["planbook", str(out), "dvh", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "no plan 'nope'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["planbook", str(out), "dvh", "box"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["planbook", str(out), "dvh", "box", "--out", str(tmp_path / "dvh")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_planbook_summary_as_pdf(example_run, tmp_path, capsys):
    _, out, _ = example_run
    plan = PlanBook.load(out).get("box-downhill")
    assert main(["planbook", str(out), "summary", "box-downhill", "--pdf", "--out", str(tmp_path / "s")]) == 0
    stem = f"physics_box-downhill_id{plan.plan_id}"
    assert {p.name for p in (tmp_path / "s").iterdir()} == {f"{stem}.md", f"{stem}.html", f"{stem}.pdf"}
    assert (tmp_path / "s" / f"{stem}.pdf").read_bytes().startswith(b"%PDF-")
    md = (tmp_path / "s" / f"{stem}.md").read_text()
    assert f"plan ID {plan.plan_id}" in md and "point P1" in md
    assert main(["planbook", str(out), "summary", "--out", str(tmp_path / "t")]) == 2
    assert "takes one PLAN" in capsys.readouterr().err


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
