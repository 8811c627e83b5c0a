"""Shared benchmark helpers: timing with warm-up and GPU synchronisation, the BENCH.md JSON format."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ids_engine import __version__, backend

RESULTS = Path(__file__).resolve().parent / "results"


def time_stage(fn: Callable[[], object], n: int = 7, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``n`` times timed (GPU synchronised); ms stats."""
    for _ in range(warmup):
        fn()
        backend.synchronize()
    times = []
    for _ in range(n):
        backend.synchronize()
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    t = np.asarray(times)
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "n": int(n)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(benchmark: str, case: dict, stages: dict, reference: dict | None = None,
                 quality: dict | None = None, suffix: str = "") -> Path:
    """Write ``bench/results/<benchmark>-<backend>-<device>.json`` (BENCH.md format)."""
    info = backend.backend_info()
    ref_stages = (reference or {}).get("stages_ms", {})
    ratios = {k: round(v / stages[k]["median_ms"], 3) for k, v in ref_stages.items() if k in stages and stages[k]["median_ms"] > 0}
    doc = {
        "benchmark": benchmark,
        "version": __version__,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": info.name,
        "device": info.device,
        "case": case,
        "stages": stages,
        "reference": reference or {},
        "ratios": ratios,
        "quality": quality or {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{benchmark}{('-' + suffix) if suffix else ''}-{info.name}-{device_slug(info.device if info.name == 'cupy' else 'cpu')}.json"
    path = RESULTS / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(title: str, stages: dict, reference_ms: dict | None = None) -> None:
    reference_ms = reference_ms or {}
    print(f"\n{title}")
    print(f"{'stage':<28} {'median ms':>10} {'p10':>9} {'p90':>9} {'n':>4} {'paper ms':>9} {'ratio':>8}")
    print("-" * 82)
    for k, s in stages.items():
        ref = reference_ms.get(k)
        ratio = f"{ref / s['median_ms']:.2f}x" if ref and s["median_ms"] > 0 else ""
        print(f"{k:<28} {s['median_ms']:>10.2f} {s['p10_ms']:>9.2f} {s['p90_ms']:>9.2f} {s['n']:>4} "
              f"{(f'{ref:g}' if ref else ''):>9} {ratio:>8}")
