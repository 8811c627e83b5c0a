"""The plan report: both files written, the goal table in them, no patient identifiers, the DVH
plot embedded or (without matplotlib) said to be left out."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from ids_engine.evaluation import Prescription, dvh_png, write_plan_report
from ids_engine.evaluation import _report
from ids_engine.model import Beam

from .test_goals import small_dose, small_patient

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
GOALS = ("PTV D95 >= 48 Gy", "PTV D2 <= 52 Gy", "Spinal cord Dmax <= 45 Gy (PRV)")
BEAMS = (Beam("G0", gantry_deg=0.0), Beam("G120", gantry_deg=120.0, collimator_deg=10.0),
         {"name": "G240", "gantry_deg": 240.0, "weight": 0.4})


def _write(tmp_path, **kw):
    p = small_patient(name="Doe^Jane")
    args = dict(prescription=Prescription(50.0, 25, "PTV"), beams=BEAMS, goals=GOALS, case_label="phantom-1")
    return p, write_plan_report(tmp_path / "out", small_dose(p), p, **(args | kw))


def test_report_writes_markdown_and_html_with_the_goal_table(tmp_path):
    p, rep = _write(tmp_path)
    md = rep.markdown_path.read_text(encoding="utf-8")
    page = rep.html_path.read_text(encoding="utf-8")
    for heading in ("Prescription", "Target volumes", "OAR constraints", "Beams", "DVH metrics", "Goal checks", "DVH"):
        assert f"## {heading}\n" in md
        assert f"<h2>{heading}</h2>" in page
    assert "| Structure | Goal | Achieved | Result |" in md
    assert "| PTV | D95 >= 48 Gy | 48 Gy | pass |" in md
    assert "| PTV | D2 <= 52 Gy | 53 Gy | FAIL |" in md
    assert "| Spinal cord | Dmax <= 45 Gy (PRV) | 17 Gy | pass |" in md
    assert "2 of 3 goals met." in md
    assert '<td class="FAIL">FAIL</td>' in page
    assert "| Total dose | 50 Gy |" in md and "| Dose per fraction | 2 Gy |" in md
    assert "| G120 | 120 | 0 | 10 | 6 | 1000 | (0.0, 0.0, 0.0) | - |" in md
    assert "| G240 | 240 | - | - | - | - | - | 0.4 |" in md
    assert "| PTV | CI (Paddick) |" in md and "| PTV | HI (ICRU 83) |" in md and "| plan | GI |" in md
    assert [r.passed for r in rep.goals] == [True, False, True] and not rep.all_goals_met
    # The case label names the case; the patient's name and UID go nowhere.
    assert "phantom-1" in md and "phantom-1" in page
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)  # the image's bytes may spell anything
    for secret in (p.name, "Doe", p.frame_of_reference_uid):
        assert secret not in md and secret not in text


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (bench extra) not installed")
def test_report_embeds_the_dvh_png(tmp_path):
    _, rep = _write(tmp_path)
    assert rep.png_path is not None and rep.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![DVH]({rep.png_path.name})" in rep.markdown_path.read_text(encoding="utf-8")
    assert 'src="data:image/png;base64,' in rep.html_path.read_text(encoding="utf-8")


def test_report_without_matplotlib_says_the_plot_was_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(_report, "_load_matplotlib", lambda: None)
    p, rep = _write(tmp_path, prescription=50.0, beams=(), goals=())
    assert rep.png_path is None
    assert not list((tmp_path / "out").glob("*.png"))
    for path in (rep.markdown_path, rep.html_path):
        text = path.read_text(encoding="utf-8")
        assert "DVH plot left out: matplotlib is not installed" in text
        assert "No beams given." in text and "No goals given." in text
    assert dvh_png(tmp_path / "x.png", small_dose(p), p) is None


def test_report_refuses_a_dose_on_another_grid(tmp_path):
    p = small_patient()
    with pytest.raises(ValueError, match="shape"):
        write_plan_report(tmp_path, np.zeros((3, 3, 3)), p, prescription=50.0)


@pytest.mark.parametrize(("kwargs", "field"), [({"dose_gy": -1}, "dose_gy"), ({"dose_gy": 50, "fractions": 2.5}, "fractions")])
def test_prescription_fields(kwargs, field):
    with pytest.raises(ValueError, match=f"Prescription.{field}"):
        Prescription(**kwargs)


def test_a_goal_missed_by_the_optimisers_tolerance_reads_limit(tmp_path):
    """D2 is 53.0 Gy: against <= 52.995 Gy it misses by 0.005 Gy, within the 0.01 Gy an optimiser
    meets constraints to, so the report says "limit" (third decimal), as ``ids plan`` does;
    against <= 52.9 Gy it fails."""
    _, rep = _write(tmp_path, goals=("PTV D2 <= 52.995 Gy", "PTV D2 <= 52.9 Gy"))
    md = rep.markdown_path.read_text(encoding="utf-8")
    page = rep.html_path.read_text(encoding="utf-8")
    assert "| PTV | D2 <= 52.995 Gy | 53.000 Gy | limit |" in md
    assert "| PTV | D2 <= 52.9 Gy | 53 Gy | FAIL |" in md
    assert "0 of 2 goals met. 1 on the limit" in md
    assert '<td class="limit">limit</td>' in page
    assert [r.state for r in rep.goals] == ["limit", "FAIL"]
