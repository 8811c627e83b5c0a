"""``ids plan``: inverse planning from the command line, on the coarse TG-119 phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ids_engine.cli import main

PROTOCOL = Path(__file__).resolve().parents[1] / "examples" / "protocols" / "tg119_harder.toml"


@pytest.fixture(scope="module")
def plan_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "tg119"
    rc = main(["plan", "tg119", str(PROTOCOL), "--out", str(out), "--resolution", "coarse",
               "--prescription-gy", "50", "--check", "tg119-harder"])
    assert rc == 0
    return out


def test_plan_writes_session_report_and_results(plan_folder):
    for name in ("plan.json", "protocol.toml", "plan_report.md", "plan_report.html", "session/session.json",
                 "session/journal.jsonl"):
        assert (plan_folder / name).exists(), name
    doc = json.loads((plan_folder / "plan.json").read_text())
    assert doc["case"] == "phantom tg119 (coarse)"
    # The optimiser worked on the engine's dose (the cutoff's tail put back).
    assert doc["optimiser"]["tail_error_pct_of_max"] < 0.05
    checks = {c["goal"]: c for c in doc["checks"]}
    # TG-119's published goals, the harder set, on the coarse grid with 9 beams.
    assert checks["OuterTarget D95 >= 50 Gy"]["achieved"] > 49.9
    assert checks["OuterTarget D10 <= 55 Gy"]["passed"]
    assert checks["Core D10 <= 10 Gy"]["passed"]
    assert "| Core | D10 <= 10 Gy (harder) |" in (plan_folder / "plan_report.md").read_text()
    # No structure of the coarse phantom is large enough to be sampled: every voxel is a row.
    assert doc["rows"]["mode"] == "exact" and doc["rows"]["rows"] == doc["influence"]["shape"][0]


@pytest.mark.parametrize("flag", [True, False])
def test_exact_rows_flag_turns_sampling_off(tmp_path, monkeypatch, flag):
    """``--exact-rows`` hands ``optimise_plan`` no row sampling, its absence the default
    ``RowSampling()`` (the coarse phantom's body is too small to be sampled either way, so the
    call itself is what is checked), and plan.json reports the rows."""
    from ids_engine import planning
    from ids_engine.optimise import RowSampling

    seen = []
    real = planning.optimise_plan

    def spy(*a, **kw):
        seen.append(kw.get("row_sampling", "missing"))
        return real(*a, **kw)

    monkeypatch.setattr(planning, "optimise_plan", spy)
    out = tmp_path / "p"
    body = Path(__file__).resolve().parents[1] / "examples" / "protocols" / "horseshoe_body.toml"
    rc = main(["plan", "horseshoe", str(body), "--out", str(out), "--resolution", "coarse"] + (["--exact-rows"] if flag else []))
    assert rc == 0
    assert len(seen) == 1
    assert (seen[0] is None) if flag else (seen[0] == RowSampling())
    doc = json.loads((out / "plan.json").read_text())
    assert doc["rows"]["mode"] == "exact" and doc["rows"]["rows"] == doc["influence"]["shape"][0]


def test_the_planned_session_reopens_to_the_same_dose(plan_folder):
    from ids_engine.evaluation import StructureDose
    from ids_engine.session import Session

    s = Session.load(plan_folder / "session", keep_journaling=False)
    d = s.dose()
    core = StructureDose(d, s.patient.structure("Core").mask, s.patient.grid.voxel_volume_cc)
    doc = json.loads((plan_folder / "plan.json").read_text())
    d10 = next(c["achieved"] for c in doc["checks"] if c["goal"] == "Core D10 <= 10 Gy")
    assert core.dose_at_volume_pct(10) == pytest.approx(d10, abs=1e-3)
    assert np.isfinite(d).all()


@pytest.mark.parametrize("args, match", [
    (["tg119", "{protocol_bad}", "--out", "{out}"], "Spine"),
    (["nowhere", "{protocol}", "--out", "{out}"], "not a built-in phantom"),
    (["tg119", "{protocol}", "--out", "{file}"], "a file, not a folder"),
])
def test_plan_errors_are_one_line_before_any_computing(tmp_path, capsys, args, match):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[goal]]\nstructure = "Spine"\nkind = "max_dose"\ndose_gy = 45\n')
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    subs = {"{protocol}": str(PROTOCOL), "{protocol_bad}": str(bad), "{out}": str(tmp_path / "o"), "{file}": str(a_file)}
    rc = main(["plan", *[subs.get(a, a) for a in args], "--resolution", "coarse"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_only_beamlets_that_reach_the_target_are_optimised():
    from ids_engine.dose import DoseEngine
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.planning import equispaced_beams, target_beamlets

    p = PHANTOMS["tg119"](resolution="coarse")
    target = p.structure("OuterTarget").mask
    eng = DoseEngine(p, equispaced_beams(3, p.structure("OuterTarget").centroid_xyz()))
    masks = target_beamlets(eng, target, 4, margin_mm=0.0)
    wide = target_beamlets(eng, target, 4, margin_mm=12.0)
    flat = np.flatnonzero(target.ravel())
    for geo, m, w in zip(eng.geometry, masks, wide):
        h = geo.fine.host
        pos = h.position[flat]
        # Every target voxel's beamlet is in; the grid (covering the whole body) is mostly out.
        assert m[np.floor(h.v_cells[pos]).astype(int) // 4, np.floor(h.u_cells[pos]).astype(int) // 4].all()
        assert m.sum() < 0.5 * m.size
        assert (w >= m).all() and w.sum() > m.sum()


@pytest.mark.slow
def test_tune_importance_brings_a_badly_weighted_protocol_back(tmp_path, capsys):
    """A protocol whose coverage objectives are weighted 50-100 times too low and its core
    sparing 10 times too high falls short of the checked goals' margin; ``--tune-importance`` (Powell over the log importances, Xing et al. 1999) records
    its path of factors and scores in plan.json and ends with a better score."""
    weak = tmp_path / "weak.toml"
    text = PROTOCOL.read_text()
    for old, new in (('importance = 100\nname = "target coverage"', 'importance = 0.1\nname = "target coverage"'),
                     ('importance = 50\nname = "no cold spot"', 'importance = 0.1\nname = "no cold spot"'),
                     ('importance = 80\nname = "core sparing"', 'importance = 8000\nname = "core sparing"')):
        assert old in text
        text = text.replace(old, new)
    weak.write_text(text)
    out = tmp_path / "tuned"
    rc = main(["plan", "tg119", str(weak), "--out", str(out), "--resolution", "coarse",
               "--prescription-gy", "50", "--check", "tg119-harder", "--tune-importance"])
    assert rc == 0
    doc = json.loads((out / "plan.json").read_text())
    tuning = doc["importance_tuning"]
    assert tuning is not None
    assert len(tuning["path"]) == tuning["evaluations"] >= 2
    assert tuning["initial_score"] > 0
    assert tuning["best_score"] < 0.5 * tuning["initial_score"]
    assert tuning["path"][tuning["best_step"]]["score"] == tuning["best_score"]
    printed = capsys.readouterr().out
    assert "importance" in printed.lower()


def test_a_check_on_the_limit_reads_limit_not_fail():
    """The optimiser meets constraints to 0.01 Gy: 57.49998 Gy against D95 >= 57.5 Gy is on
    the limit (shown to the third decimal), 57.45 Gy fails, 57.6 Gy passes."""
    from ids_engine.cli import _check_line
    from ids_engine.evaluation import GoalResult, parse_goal

    goal = parse_goal("PTV D95 >= 57.5 Gy")
    line = lambda achieved, passed: _check_line(GoalResult(goal, achieved, passed))  # noqa: E731
    assert line(57.49998, False) == ("limit", "  limit PTV D95 >= 57.5 Gy: 57.500")
    assert line(57.45, False)[0] == "FAIL"
    assert line(57.6, True) == ("pass", "  pass  PTV D95 >= 57.5 Gy: 57.60")
