"""A batch of adaptations as Dask tasks on a local cluster."""

from __future__ import annotations

import json

import pytest


def test_batch_of_three_on_a_local_cluster(approved_dir, tmp_path):
    pytest.importorskip("dask.distributed")
    from ids_engine.adapt import AdaptOptions, adapt_batch

    cts = ["horseshoe:coarse", "horseshoe:coarse;shift_mm=3,0,0", "horseshoe:coarse;shift_mm=0,0,50;markers=0"]
    out = tmp_path / "batch"
    doc = adapt_batch(approved_dir, cts, out=out, n_workers=2, registration="identity",
                      options=AdaptOptions(reoptimise="never", gamma_max_points=3000))
    assert doc["tasks"] == 3 and doc["succeeded"] == 3
    assert doc["scheduler"].startswith("LocalCluster") and doc["scheduler_address"].startswith(("tcp://", "inproc://"))
    assert [r["new_ct"] for r in doc["results"]] == cts
    on_disk = json.loads((out / "batch_summary.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    for r in doc["results"]:
        assert (out / r["folder"] / "qualification.json").is_file()
        assert (out / r["folder"] / "session" / "session.json").is_file()
    # Unshifted: qualified; 50 mm off in z without registration: the true contours say no.
    assert doc["results"][0]["auto_qualified_for_review"]
    assert not doc["results"][2]["auto_qualified_for_review"]
