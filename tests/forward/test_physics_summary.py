"""The physics summary: plan ID, beams, MU, point doses with per-beam contributions in
patient and BEV coordinates, DVH metrics."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest

from ids_engine.evaluation import dvh_metrics, physics_summary, write_physics_summary
from ids_engine.planning import BeamField, DoseToNormalisation, PointRef, apply_prescription

WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def summary(box):
    patient, plan, doses = box
    rx = DoseToNormalisation(2.0, (1.0, 1.0, 1.0, 1.0), percent=95.0, points=(PointRef("dmax", 0), None, None, None))
    plan, _ = apply_prescription(plan, patient, doses, rx)
    return plan, physics_summary(plan, patient, doses, case_label="phantom water (coarse)", prescription_gy=2.0, when=WHEN)


def test_plan_id_and_beams_are_printed(summary):
    plan, s = summary
    assert s.plan_id == plan.plan_id == 2
    for text in (s.markdown, s.html):
        assert f"plan ID {plan.plan_id}" in text and f"Plan ID {plan.plan_id}" in text
        assert "2026-01-02 03:04:05" in text and "phantom water (coarse)" in text
    md = s.markdown
    # One row per beam: angles, isocentre, energy, SAD, SSD (100 mm of water before the AP/PA
    # isocentre, 150 mm before the laterals'), field and MU.
    assert f"| 1 | AP | 0 | 0 | 0 | (0.0, 0.0, 0.0) | 6 | 1000 | 900.0 | open 60 x 60 mm | {plan.mu[0]:g} |" in md
    assert f"| 2 | LL | 90 | 0 | 0 | (0.0, 0.0, 0.0) | 6 | 1000 | 850.0 | open 60 x 60 mm | {plan.mu[1]:g} |" in md
    assert "dose to the normalisation point: 2 Gy at 95 %" in md


def test_point_doses_add_up_and_are_placed_in_each_beam(summary, box):
    patient, _, doses = box
    plan, s = summary
    labels = [p.label for p in s.points]
    assert labels[0].startswith("normalisation (isocentre of AP)")
    assert any("dmax of AP" in lab for lab in labels) and any("point P1" in lab for lab in labels)
    for p in s.points:
        assert p.total_gy == pytest.approx(sum(p.beam_gy), rel=1e-12)
        assert p.beam_gy == pytest.approx(tuple(r * m for r, m in zip(p.beam_gy_per_mu, plan.mu)))
        for b, beam in enumerate(plan.beams):
            assert p.bev_mm_xyz[b] == pytest.approx(tuple(beam.patient_to_beam(p.position_mm_xyz)))
            assert p.bev_iso_mm_uv[b] == pytest.approx(tuple(beam.patient_to_bev(p.position_mm_xyz)[:2]))
    # The normalisation point is 100 %, with the dose of the whole MU.
    assert s.normalisation_gy == pytest.approx(s.points[0].total_gy)
    assert "| 100.0 |" in s.markdown
    # P1 (0, 30, 0) in the AP beam's BEV: 30 mm towards the PA side, i.e. z = -30 (z points to the source).
    p1 = next(p for p in s.points if p.label == "point P1")
    assert p1.bev_mm_xyz[0] == pytest.approx((0.0, 0.0, -30.0), abs=1e-9)


def test_dvh_metrics_of_every_structure(summary, box):
    patient, _, doses = box
    plan, s = summary
    dose = doses.dose(plan.mu)
    assert [r["structure"] for r in s.dvh_rows] == ["BODY", "PTV", "RING"]
    ptv = next(r for r in s.dvh_rows if r["structure"] == "PTV")
    m = dvh_metrics(dose, patient.structure("PTV").mask, 2.0)
    assert ptv["D95_gy"] == pytest.approx(m["D95_gy"]) and ptv["V95_pct"] == pytest.approx(m["V95_pct"])
    assert f"{m['D95_gy']:.3f}" in s.markdown


def test_written_files_and_refusal(summary, box, tmp_path):
    patient, plan0, doses = box
    plan, s = summary
    md, html = write_physics_summary(tmp_path, s)
    assert md.name == f"physics_box_id{plan.plan_id}.md" and html.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([md.name, html.name])
    other = plan.changed(fields=(BeamField((-40, 40), (-40, 40)),) * 4)
    with pytest.raises(ValueError, match=r"plan ID 3\) has other beams"):
        physics_summary(other, patient, doses)
    assert np.isfinite(s.normalisation_gy)


def pdf_text(data: bytes) -> str:
    """The text a PDF's pages draw (matplotlib writes each page's strings in ``[...] TJ``
    arrays of a zlib-compressed content stream); enough to check what was printed. The raw
    character codes are read, not mapped through the font's encoding: a space came out as
    code 0 once (the full suite under pytest-xdist, after other tests had drawn text in the
    same process), so code 0 is read as a space."""
    import re
    import zlib

    out = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            body = zlib.decompress(m.group(1))
        except zlib.error:
            continue
        for arr in re.finditer(rb"\[(.*?)\]\s*TJ", body, re.S):
            out.append(b"".join(re.findall(rb"\(((?:\\.|[^\\)])*)\)", arr.group(1))).decode("latin-1"))
    return "\n".join(out).replace("\x00", " ")


def test_the_pdf_is_a_valid_pdf_with_the_plan_id_on_every_page(summary, tmp_path):
    from ids_engine.evaluation._physics_summary import write_physics_summary_pdf

    plan, s = summary
    path = write_physics_summary_pdf(tmp_path / "physics.pdf", s)
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    n_pages = len(re.findall(rb"/Type\s*/Page\b", data))
    assert n_pages >= 2  # the tables, then the DVH picture
    assert f"plan ID {plan.plan_id}".encode() in data  # the document's title (uncompressed metadata)
    text = pdf_text(data)
    assert text.count(f"plan ID {plan.plan_id}") >= 2 * n_pages  # header and footer of every page
    assert f"page {n_pages} of {n_pages}" in text
    # The beams with their MU, the per-beam point doses with BEV coordinates, the DVH metrics.
    assert "Point doses per beam" in text and "BEV x, y, z mm" in text and "DVH metrics" in text
    for b, m in zip(plan.beams, plan.mu):
        assert any(line.split()[:2] == [str(plan.beams.index(b) + 1), b.name] and line.split()[-1] == f"{m:g}"
                   for line in text.splitlines())
    p1 = next(p for p in s.points if "point P1" in p.label)
    assert f"{p1.total_gy:.4f}" in text
    # The DVH page: a curve per structure (its DVH ends at the structure's maximum dose).
    assert len(s.dvhs) == len(s.dvh_rows) and {h.name for h, _ in s.dvhs} == {r["structure"] for r in s.dvh_rows}
    for (h, _), r in zip(s.dvhs, s.dvh_rows):
        last = h.dose_gy[np.flatnonzero(h.volume_fraction > 0)[-1]]
        assert last <= r["max_gy"] < last + 2 * (h.dose_gy[1] - h.dose_gy[0])
