"""Batches of adaptations as Dask tasks: on a scheduler given by address, and from the CLI on
the default local cluster."""

from __future__ import annotations

import json

import pytest

from ids_engine.cli import main


def test_batch_of_three_on_a_local_cluster_by_address(approved_dir, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    from ids_engine.adapt import AdaptOptions, adapt_batch

    cts = ["horseshoe:coarse", "horseshoe:coarse;shift_mm=3,0,0", "horseshoe:coarse;shift_mm=0,0,50;markers=0"]
    out = tmp_path / "batch"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        doc = adapt_batch(approved_dir, cts, out=out, scheduler=cluster.scheduler_address, registration="identity",
                          options=AdaptOptions(reoptimise="never", gamma_max_points=3000))
        assert doc["scheduler_address"] == cluster.scheduler_address
    assert doc["tasks"] == 3 and doc["succeeded"] == 3
    assert [r["new_ct"] for r in doc["results"]] == cts
    on_disk = json.loads((out / "batch_summary.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    for r in doc["results"]:
        assert (out / r["folder"] / "qualification.json").is_file()
        assert (out / r["folder"] / "session" / "session.json").is_file()
    # Unshifted: qualified; 50 mm off in z without registration: the true contours say no.
    assert doc["results"][0]["auto_qualified_for_review"]
    assert not doc["results"][2]["auto_qualified_for_review"]


def test_cli_batch_on_the_default_local_cluster(approved_dir, tmp_path, capsys):
    pytest.importorskip("dask.distributed")
    out = tmp_path / "batch"
    rc = main(["adapt", str(approved_dir), "horseshoe:coarse", "nosuchphantom:coarse", "--out", str(out),
               "--registration", "identity", "--reoptimise", "never", "--gamma-points", "2000"])
    captured = capsys.readouterr()
    # One adaptation fails (an unknown phantom): reported, the other one is done.
    assert rc == 1 and "nosuchphantom" in captured.err
    doc = json.loads((out / "batch_summary.json").read_text())
    assert doc["scheduler"] == "LocalCluster (2 threads)"
    assert [r["ok"] for r in doc["results"]] == [True, False]
    assert (out / doc["results"][0]["folder"] / "adapt_report.md").is_file()
    assert "batch of 2" in captured.out
