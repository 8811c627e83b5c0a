"""Batches of adaptations on Dask (``dask.distributed``): one task per new CT.

A ``LocalCluster`` by default (threads or processes on this machine), or any running
scheduler given by address (``tcp://host:8786``); the workers must then see the same file
system paths (the approved plan, the new CTs and the output folder). Each task is one
:func:`~ids_engine.adapt.run_adaptation` writing its own sub-folder; a failed task is
reported in the summary and does not stop the others.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

__all__ = ["adapt_batch"]


def _sub_name(n: int, new_ct: str) -> str:
    stem = Path(new_ct).name if Path(new_ct).is_dir() else new_ct
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", stem).strip("._")[:48] or "ct"
    return f"{n:02d}_{safe}"


def _one(approved, new_ct: str, out: str, final: str, kwargs: dict) -> dict:
    """One adaptation (runs on a Dask worker); never raises: errors are reported."""
    from ._run import run_adaptation

    t0 = time.perf_counter()
    try:
        doc = run_adaptation(approved, new_ct, out, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one failed adaptation must not end the batch
        return {"new_ct": new_ct, "folder": Path(final).name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "wall_s": round(time.perf_counter() - t0, 3)}
    q = doc["qualification"]
    return {"new_ct": new_ct, "folder": Path(final).name, "ok": True,
            "auto_qualified_for_review": q["auto_qualified_for_review"], "reasons": q["reasons"],
            "reoptimised": doc["adaptation"]["reoptimised"],
            "gamma_pass_pct": {k: v["pass_rate_pct"] for k, v in doc["comparison"]["adapted"]["gamma"].items()},
            "registration": doc["registration"].get("kind"), "timings_s": doc["timings_s"],
            "wall_s": round(time.perf_counter() - t0, 3)}


def adapt_batch(approved, new_cts, *, out, scheduler: str | None = None, n_workers: int = 2,
                threads_per_worker: int = 1, processes: bool = False, force: bool = False, progress=None,
                log=None, **kwargs) -> dict:
    """Adapt one approved plan to several new CTs as Dask tasks.

    Parameters
    ----------
    approved : the approved plan's folder (each worker reads it) or an
        :class:`~ids_engine.adapt.ApprovedPlan` (sent to the workers once).
    new_cts : DICOM folders or test case specs (see :func:`~ids_engine.adapt.load_new_ct`).
    out : the batch folder: one sub-folder per new CT (``01_<name>``, ...) and
        ``batch_summary.json``; must not exist or be empty unless ``force``.
    scheduler : a Dask scheduler address; None starts a ``LocalCluster`` of ``n_workers``
        workers (``processes``: worker processes instead of threads), closed afterwards.
    progress : ``progress(done, total, label)`` as tasks finish.
    log : ``log(text)``, one line per finished task.
    **kwargs : passed to :func:`~ids_engine.adapt.run_adaptation` (registration, tolerance,
        options, ...; not ``progress``).

    Returns
    -------
    dict: the summary written to ``batch_summary.json`` (one entry per new CT, in order).
    """
    from dask.distributed import Client, LocalCluster, as_completed

    from ids_engine._files import atomic_text
    from ids_engine.scripting import _swap_in, check_out_folder

    from ._approved import AdaptError

    new_cts = [str(c) for c in new_cts]
    if not new_cts:
        raise AdaptError("adapt_batch: no new CT given")
    out = check_out_folder(out, force=force)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("progress", "force")}
    if isinstance(kwargs.get("tolerance"), Path):
        kwargs["tolerance"] = str(kwargs["tolerance"])
    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    dest.mkdir(parents=True, exist_ok=True)
    names = [_sub_name(n + 1, c) for n, c in enumerate(new_cts)]
    t0 = time.perf_counter()
    cluster = None
    if scheduler:
        client = Client(scheduler, set_as_default=False)
    else:
        cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=int(threads_per_worker),
                               processes=bool(processes), dashboard_address=None)
        client = Client(cluster, set_as_default=False)
    try:
        ap = approved if isinstance(approved, (str, Path)) else client.scatter(approved, broadcast=True)
        if isinstance(ap, Path):
            ap = str(ap.absolute())
        futures = {client.submit(_one, ap, c, str(dest / name), str(out.absolute() / name), kwargs, pure=False,
                                 key=f"ids-adapt-{name}-{os.getpid()}"): n
                   for n, (c, name) in enumerate(zip(new_cts, names))}
        results = [None] * len(new_cts)
        with client.as_current():
            for done, fut in enumerate(as_completed(futures), start=1):
                n = futures[fut]
                results[n] = fut.result()
                if progress is not None:
                    progress(done, len(new_cts), "adaptations")
                if log is not None:
                    r = results[n]
                    state = ("error: " + r["error"]) if not r["ok"] else (
                        "auto-qualified for review" if r["auto_qualified_for_review"] else "not qualified")
                    log(f"{names[n]}: {state} ({r['wall_s']:.1f} s)")
        where = client.scheduler.address if hasattr(client, "scheduler") and client.scheduler else scheduler
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    doc = {"format": "ids-engine adaptation batch 1", "scheduler": scheduler or f"LocalCluster ({n_workers} "
           f"{'processes' if processes else 'threads'})", "scheduler_address": str(where),
           "tasks": len(new_cts), "succeeded": sum(r["ok"] for r in results),
           "auto_qualified": sum(bool(r.get("auto_qualified_for_review")) for r in results),
           "wall_s": round(time.perf_counter() - t0, 3), "results": results}
    atomic_text(dest / "batch_summary.json", json.dumps(doc, indent=1))
    if dest != out:
        _swap_in(dest, out)
    return doc
