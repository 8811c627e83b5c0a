"""The deliverable dose of a sequenced plan, its gap to the fluence dose, and segment weights
re-optimised to close it.

Deliverable fluence of a segment (per MU): the aperture's open-area fraction on the beam's
fluence grid plus the MLC's leaf transmission inside the jaws
(:func:`~ids_engine.deliver.aperture_fluence`), less a **tongue-and-groove** strip: along each
boundary between two neighbouring leaf pairs a strip ``tongue_groove_mm`` wide (half on
each side) is open only where *both* pairs are open (the tongue of one leaf shadows the
groove of the other wherever one of them is closed), as in the usual first-order model (van
Santvoort and Heijmen, Phys. Med. Biol. 41 (1996) 2091). Rounded leaf ends, optionally, as a
dosimetric leaf gap: every leaf tip taken ``leaf_gap_mm / 2`` further back (default 0: not
modelled).

The dose of every segment at sampled voxels comes from the engine's own model
(:meth:`~ids_engine.dose.DoseEngine.delta_matrix`); the segment weights (MU per fraction,
at least the minimum MU) are re-optimised by bounded linear least squares
(:func:`scipy.optimize.lsq_linear`) against the fluence dose at those voxels, targets and
organs at risk weighted more than the rest of the body.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import lsq_linear

from ..dose import DoseEngine, FluencePatch
from ..model import FluenceGrid
from ..model._mlc import MLC
from ._types import Aperture, DeliverablePlan, Segment, SequencedBeam, _overlap, aperture_fluence

__all__ = [
    "DEFAULT_TONGUE_GROOVE_MM",
    "DeliverableCheck",
    "segment_fluence",
    "deliverable_fluences",
    "segment_influence",
    "reoptimise_weights",
    "check_deliverable",
]

#: Width of the tongue-and-groove strip along each leaf-pair boundary (mm at the isocentre).
DEFAULT_TONGUE_GROOVE_MM = 0.5


def segment_fluence(aperture: Aperture, mlc: MLC, grid: FluenceGrid, *,
                    tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM, leaf_gap_mm: float = 0.0) -> np.ndarray:
    """(nv, nu) float32 fluence of one MU through ``aperture``: :func:`aperture_fluence` less
    the tongue-and-groove shadow (see the module description).

    ``leaf_gap_mm``: rounded leaf ends as a dosimetric leaf gap, each leaf tip taken
    ``leaf_gap_mm / 2`` further back (every pair, closed ones too; the jaws still limit the
    field). 0 (default): not modelled; a commissioned value is typically 1-2 mm."""
    w = float(tongue_groove_mm)
    if w < 0 or not np.isfinite(w):
        raise ValueError(f"tongue_groove_mm must be >= 0, got {tongue_groove_mm!r}")
    g = float(leaf_gap_mm)
    if g < 0 or not np.isfinite(g):
        raise ValueError(f"leaf_gap_mm must be >= 0, got {leaf_gap_mm!r}")
    if g > 0:
        aperture = Aperture(aperture.leaf_x1_mm - g / 2, aperture.leaf_x2_mm + g / 2, aperture.jaw_x_mm, aperture.jaw_y_mm)
    f = aperture_fluence(aperture, mlc, grid).astype(np.float64)
    if w == 0 or mlc.n_pairs < 2:
        return f.astype(np.float32)
    p = grid.pitch_mm
    u, v = grid.u_mm(), grid.v_mm()
    e = mlc.leaf_boundaries_mm()[1:-1]  # the inner boundaries, pair k below / k + 1 above
    jx, jy = aperture.jaw_x_mm, aperture.jaw_y_mm
    a = np.maximum(aperture.leaf_x1_mm, jx[0])
    b = np.minimum(aperture.leaf_x2_mm, jx[1])
    ab = np.maximum(a[:-1], a[1:])
    bb = np.minimum(b[:-1], b[1:])
    u_lo, u_hi = u - p / 2, u + p / 2
    fu_lower = _overlap(u_lo[None], u_hi[None], a[:-1, None], np.maximum(a, b)[:-1, None]) / p
    fu_upper = _overlap(u_lo[None], u_hi[None], a[1:, None], np.maximum(a, b)[1:, None]) / p
    fu_both = _overlap(u_lo[None], u_hi[None], ab[:, None], np.maximum(ab, bb)[:, None]) / p
    v_lo, v_hi = v - p / 2, v + p / 2
    lo_strip = _overlap(v_lo[None], v_hi[None], np.maximum(e - w / 2, jy[0])[:, None], np.minimum(e, jy[1])[:, None]) / p
    hi_strip = _overlap(v_lo[None], v_hi[None], np.maximum(e, jy[0])[:, None], np.minimum(e + w / 2, jy[1])[:, None]) / p
    # einsum, not BLAS: tiny products that a contended multi-threaded BLAS makes slow.
    loss = np.einsum("kv,ku->vu", lo_strip, fu_lower - fu_both) + np.einsum("kv,ku->vu", hi_strip, fu_upper - fu_both)
    return (f - (1.0 - mlc.transmission) * loss).astype(np.float32)


def _segment_fluences(plan: DeliverablePlan, tongue_groove_mm: float, cache: dict | None = None,
                      leaf_gap_mm: float = 0.0) -> list[list[np.ndarray]]:
    """Per beam, per segment: :func:`segment_fluence` (``cache`` keyed by the aperture's id,
    so a plan with re-optimised MU but the same apertures reuses them)."""
    out = []
    for sb in plan.beams:
        g = _grid(sb)
        row = []
        for s in sb.segments:
            key = id(s.aperture)
            if cache is not None and key in cache:
                row.append(cache[key][1])
                continue
            f = segment_fluence(s.aperture, sb.mlc, g, tongue_groove_mm=tongue_groove_mm, leaf_gap_mm=leaf_gap_mm)
            if cache is not None:
                cache[key] = (s.aperture, f)  # the aperture is held so its id stays unique
            row.append(f)
        out.append(row)
    return out


def deliverable_fluences(plan: DeliverablePlan, *, tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM,
                         leaf_gap_mm: float = 0.0, cache: dict | None = None) -> list[np.ndarray]:
    """Per beam, the (nv, nu) float32 fluence the segments deliver over the course (MU, the
    dose engine's unit): sum of segment MU x fractions x :func:`segment_fluence`.
    ``cache``: a dict reused across calls on plans sharing apertures."""
    out = []
    for sb, fls in zip(plan.beams, _segment_fluences(plan, tongue_groove_mm, cache, leaf_gap_mm)):
        f = np.zeros(_grid(sb).shape_vu, np.float64)
        for s, sf in zip(sb.segments, fls):
            f += float(s.mu) * plan.fractions * sf
        out.append(f.astype(np.float32))
    return out


def _grid(sb: SequencedBeam) -> FluenceGrid:
    if sb.beam.fluence_grid is None:
        raise ValueError(f"beam {sb.beam.name!r} has no fluence grid")
    return sb.beam.fluence_grid


def segment_influence(engine: DoseEngine, plan: DeliverablePlan, flat_index, *,
                      tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM, leaf_gap_mm: float = 0.0,
                      cache: dict | None = None) -> np.ndarray:
    """(n voxels, n segments) float32: dose (Gy) at CT voxels ``flat_index`` per MU per
    fraction of each segment (over the course's fractions), plan order, beam by beam.

    The plan's beams must be the engine's, in order (same fluence grids)."""
    if len(plan.beams) != engine.n_beams:
        raise ValueError(f"the plan has {len(plan.beams)} beams, the dose engine {engine.n_beams}")
    for b, sb in enumerate(plan.beams):
        if _grid(sb) != engine.geometry[b].beam.fluence_grid:
            raise ValueError(f"beam {sb.beam.name!r}: its fluence grid is not the dose engine's beam {b}'s")
    cols = []
    for b, (sb, fls) in enumerate(zip(plan.beams, _segment_fluences(plan, tongue_groove_mm, cache, leaf_gap_mm))):
        patches = []
        for sf in fls:
            f = sf * np.float32(plan.fractions)
            rows, cs = np.nonzero(f)
            if rows.size == 0:
                patches.append([])
                continue
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cs.min(), cs.max() + 1
            patches.append([FluencePatch(b, int(r0), int(c0), np.ascontiguousarray(f[r0:r1, c0:c1]))])
        if patches:
            cols.append(engine.delta_matrix(patches, flat_index))
    if not cols:
        return np.zeros((np.asarray(flat_index).size, 0), np.float32)
    return np.concatenate(cols, axis=1)


def _sample(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask.ravel())
    if idx.size > n:
        idx = np.sort(rng.choice(idx, n, replace=False))
    return idx


def reoptimise_weights(engine: DoseEngine, plan: DeliverablePlan, reference_dose_gy: np.ndarray, *,
                       min_mu: float = 1.0, sample_voxels: int = 4000, target_importance: float = 1.0,
                       oar_importance: float = 1.0, body_importance: float = 2.0,
                       tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM, leaf_gap_mm: float = 0.0,
                       prune_tolerance: float | None = 0.01, seed: int = 0,
                       cache: dict | None = None) -> tuple[DeliverablePlan, dict]:
    """Segment MU that best reproduce ``reference_dose_gy`` at sampled voxels.

    Parameters
    ----------
    engine : the dose engine of the plan's beams.
    plan : the sequenced plan (its apertures are kept, only the MU change, or segments go).
    reference_dose_gy : (z, y, x) float, Gy: the dose to reproduce (the fluence plan's).
    min_mu : lower bound of every segment's MU per fraction (the machine's minimum).
    sample_voxels : voxels sampled (seeded) in the targets, as many in the organs at risk and
        as many in the rest of the body.
    target_importance, oar_importance, body_importance : row weights of the three groups (each
        group's rows are also scaled by 1 / sqrt(its size), so a group counts by its
        importance, not by its size). The rest of the body weighs most by default: the gamma
        and the low-dose DVH are judged over it (on the coarse TG-119 plan, importances
        1/1/2 improved target D95, core dose and gamma together; 1/1/0.5 traded the gamma
        for the target).

    prune_tolerance : segments the fit holds at ``min_mu`` are removed (at least one kept per
        beam) and the MU fitted again, if the weighted RMS difference grows by at most this
        fraction (default 1 %); None keeps every segment.

    Returns the plan with new MU (and without the pruned segments; the others keep their
    :class:`Aperture` objects) and a dict: ``rms_before_gy``, ``rms_after_gy`` (weighted RMS
    dose difference at the sample), ``voxels``, ``segments``, ``segments_removed``, ``solver``.
    """
    rng = np.random.default_rng(seed)
    p = engine.patient
    body = p.body_mask()
    targets = p.kind_mask("target")
    oars = p.kind_mask("oar")
    groups = ((targets & body, target_importance), (oars & body & ~targets, oar_importance),
              (body & ~targets & ~oars, body_importance))
    parts = [(_sample(m, sample_voxels, rng), imp) for m, imp in groups]
    idx = np.concatenate([i for i, _ in parts])
    if idx.size == 0:
        raise ValueError("reoptimise_weights: the patient has no body voxels to sample")
    w_rows = np.concatenate([np.full(i.size, imp / np.sqrt(max(i.size, 1))) for i, imp in parts])
    A = segment_influence(engine, plan, idx, tongue_groove_mm=tongue_groove_mm, leaf_gap_mm=leaf_gap_mm,
                          cache=cache).astype(np.float64)
    d = np.asarray(reference_dose_gy, dtype=np.float64).ravel()[idx]
    w0 = np.array([s.mu for sb in plan.beams for s in sb.segments])
    Aw = A * w_rows[:, None]
    dw = d * w_rows
    norm = np.sqrt(np.sum(w_rows**2))

    def solve(cols: np.ndarray) -> tuple[np.ndarray, str]:
        lo = np.full(cols.size, float(min_mu))
        r = lsq_linear(Aw[:, cols], dw, bounds=(lo, np.full(cols.size, np.inf)), method="bvls", lsmr_tol="auto")
        w = np.zeros(w0.size)
        w[cols] = np.maximum(r.x, lo)
        return w, r.message.strip()

    def rms(w):
        return float(np.linalg.norm(Aw @ w - dw) / norm)

    keep = np.arange(w0.size)
    w1, message = solve(keep)
    removed = 0
    if prune_tolerance is not None and w0.size:
        # Segments held at the minimum MU are the ones the fit would take lower: drop them
        # (keeping at least one segment per beam) if the fit loses at most the tolerance.
        beam_of = np.repeat(np.arange(len(plan.beams)), [len(sb.segments) for sb in plan.beams])
        at_min = w1 <= float(min_mu) * (1 + 1e-6) + 1e-9
        for b in range(len(plan.beams)):
            mine = beam_of == b
            if mine.any() and at_min[mine].all():
                at_min[np.flatnonzero(mine)[np.argmax(w1[mine])]] = False
        if at_min.any():
            trial, trial_message = solve(np.flatnonzero(~at_min))
            if rms(trial) <= rms(w1) * (1 + prune_tolerance):
                w1, message, removed = trial, trial_message, int(at_min.sum())
    info = {"rms_before_gy": rms(w0), "rms_after_gy": rms(w1), "voxels": int(idx.size), "segments": int(w0.size),
            "segments_removed": removed, "solver": f"scipy lsq_linear bvls ({message})"}
    beams, k = [], 0
    for sb in plan.beams:
        n = len(sb.segments)
        segs = tuple(Segment(s.aperture, float(w1[k + i])) for i, s in enumerate(sb.segments) if w1[k + i] > 0)
        k += n
        beams.append(dataclasses.replace(sb, segments=segs))
    return dataclasses.replace(plan, beams=tuple(beams)), info


@dataclass(frozen=True, eq=False)
class DeliverableCheck:
    """The fluence plan against its sequenced plan, before and after re-optimising the MU.

    reference_gy, sequenced_gy, reoptimised_gy : (z, y, x) float32 doses (Gy); the last is
        None when not re-optimised.
    plan, reoptimised : the sequenced plan and the one with re-optimised MU (or None).
    gamma : ``{stage: {criterion: gamma_summary}}`` for stages "sequenced", "reoptimised"
        and criteria "3%/3mm", "2%/2mm" (global, 10 % cutoff).
    comparison : ``{stage: PlanComparison}`` of DVH metrics against the fluence plan.
    reoptimisation : the dict of :func:`reoptimise_weights` (empty when not run).
    options : the settings used (tongue-and-groove width, gamma points, ...).
    """

    reference_gy: np.ndarray
    sequenced_gy: np.ndarray
    reoptimised_gy: np.ndarray | None
    plan: DeliverablePlan
    reoptimised: DeliverablePlan | None
    gamma: dict
    comparison: dict
    reoptimisation: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def beam_rows(self) -> list[dict]:
        """Per beam: name, segments, MU per fraction sequenced and re-optimised."""
        rows = []
        for i, sb in enumerate(self.plan.beams):
            r = {"beam": sb.beam.name, "segments": len(sb.segments), "mu": sb.mu}
            if self.reoptimised is not None:
                r["segments_reoptimised"] = len(self.reoptimised.beams[i].segments)
                r["mu_reoptimised"] = self.reoptimised.beams[i].mu
            rows.append(r)
        return rows

    def to_markdown(self, title: str = "Deliverable dose check") -> str:
        o = self.options
        rx = self.plan.prescription_gy
        lines = [f"# {title}", "",
                 f"Sequenced with {o.get('method', '?')} ({o.get('levels', '?')} levels, bixel {o.get('bixel_mm', '?')} mm, "
                 f"pair fluence {o.get('pair_sampling', 'mean')}, "
                 f"minimum {o.get('min_mu', '?')} MU per segment and fraction, {self.plan.fractions} fraction(s)) on MLC "
                 f"{self.plan.beams[0].mlc.name if self.plan.beams else '?'}; deliverable fluence = aperture area "
                 f"fractions + leaf transmission ({self.plan.beams[0].mlc.transmission if self.plan.beams else 0:g}) + "
                 f"tongue-and-groove strip {o.get('tongue_groove_mm', 0):g} mm; rounded leaf ends "
                 + (f"as a {o['leaf_gap_mm']:g} mm dosimetric leaf gap." if o.get("leaf_gap_mm") else "not modelled."), "",
                 "## Segments and MU (per fraction)", ""]
        rows = self.beam_rows()
        has_re = self.reoptimised is not None
        lines.append("| Beam | Segments | MU |" + (" Segments re-optimised | MU re-optimised |" if has_re else ""))
        lines.append("| --- | ---: | ---: |" + (" ---: | ---: |" if has_re else ""))
        for r in rows:
            lines.append(f"| {r['beam']} | {r['segments']} | {r['mu']:.1f} |"
                         + (f" {r['segments_reoptimised']} | {r['mu_reoptimised']:.1f} |" if has_re else ""))
        tot = sum(r["mu"] for r in rows)
        lines.append(f"| total | {sum(r['segments'] for r in rows)} | {tot:.1f} |"
                     + (f" {sum(r['segments_reoptimised'] for r in rows)} | {sum(r['mu_reoptimised'] for r in rows):.1f} |"
                        if has_re else ""))
        lines += ["", "## Gamma against the fluence dose (global, 10 % low-dose cutoff)", "",
                  "| Dose | Criterion | Pass rate | Mean gamma | 95th percentile | Points |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for stage, crit in self.gamma.items():
            for c, s in crit.items():
                lines.append(f"| {stage} | {c} | {s['pass_rate_pct']:.1f} % | {s['mean']:.2f} | {s['p95']:.2f} | {s['points']} |")
        dmax = float(self.reference_gy.max())
        lines += ["", "Largest dose difference to the fluence dose: "
                  + ", ".join(f"{k} {float(np.abs(v - self.reference_gy).max()):.2f} Gy "
                              f"({100 * float(np.abs(v - self.reference_gy).max()) / dmax:.1f} % of its maximum)"
                              for k, v in (("sequenced", self.sequenced_gy), ("re-optimised", self.reoptimised_gy)) if v is not None)
                  + "."]
        if self.reoptimisation:
            r = self.reoptimisation
            lines += ["", f"Segment MU re-optimised ({r['solver']}) on {r['voxels']} sampled voxels "
                          f"(targets, organs at risk, rest of the body): weighted RMS dose difference {r['rms_before_gy']:.3f} -> "
                          f"{r['rms_after_gy']:.3f} Gy; {r.get('segments_removed', 0)} segment(s) held at the minimum MU "
                          f"removed."]
        for stage, comp in self.comparison.items():
            lines += ["", f"## DVH metrics: fluence plan against the {stage} plan" + (f" (prescription {rx:g} Gy)" if rx else ""), "",
                      comp.to_markdown()]
        return "\n".join(lines) + "\n"


def check_deliverable(engine: DoseEngine, plan: DeliverablePlan, *, reference_fluences=None,
                      tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM, leaf_gap_mm: float = 0.0,
                      reoptimise: bool = True,
                      min_mu: float = 1.0, prune_tolerance: float | None = 0.01, gamma_points: int | None = 20000,
                      sample_voxels: int = 4000, seed: int = 0, options: dict | None = None,
                      progress=None) -> DeliverableCheck:
    """Deliverable dose of ``plan`` against the fluence dose, then with re-optimised MU.

    Parameters
    ----------
    engine : the dose engine of the plan's beams. Its fluences are the reference unless
        ``reference_fluences`` is given; they are restored on return.
    plan : the sequenced plan (e.g. :func:`~ids_engine.deliver.sequence_plan` of the
        engine's fluences).
    tongue_groove_mm : the tongue-and-groove strip (0: none).
    leaf_gap_mm : the rounded leaf ends' dosimetric leaf gap (0: not modelled).
    reoptimise : also re-optimise the segment MU (:func:`reoptimise_weights`).
    min_mu : least MU per segment and fraction in the re-optimisation.
    prune_tolerance : see :func:`reoptimise_weights` (None: no segment is removed).
    gamma_points : reference voxels evaluated per gamma (seeded subset; None: all).
    options : extra settings recorded in the report (the sequencing's levels, bixel, method).
    progress : optional ``progress(done, total, label)``.
    """
    from ..evaluation import compare_plans, gamma_index, gamma_summary, grid_axes_mm

    def step(i, label):
        if progress:
            progress(i, 6, label)

    original = engine.fluences_host()
    ref_fl = original if reference_fluences is None else [np.asarray(f, np.float32) for f in reference_fluences]
    rx = plan.prescription_gy or None
    axes = grid_axes_mm(engine.grid)
    body = engine.patient.body_mask()
    try:
        step(0, "fluence dose")
        engine.set_fluences(ref_fl)
        ref = engine.dose_cube_host().astype(np.float32)
        step(1, "deliverable dose")
        cache: dict = {}
        engine.set_fluences(deliverable_fluences(plan, tongue_groove_mm=tongue_groove_mm, leaf_gap_mm=leaf_gap_mm,
                                                 cache=cache))
        seq = engine.dose_cube_host().astype(np.float32)
        stages = {"sequenced": (seq, plan)}
        info: dict = {}
        re_dose, re_plan = None, None
        if reoptimise:
            step(2, "segment weights")
            re_plan, info = reoptimise_weights(engine, plan, ref, min_mu=min_mu, sample_voxels=sample_voxels,
                                               prune_tolerance=prune_tolerance,
                                               tongue_groove_mm=tongue_groove_mm, leaf_gap_mm=leaf_gap_mm, seed=seed,
                                               cache=cache)
            engine.set_fluences(deliverable_fluences(re_plan, tongue_groove_mm=tongue_groove_mm, leaf_gap_mm=leaf_gap_mm,
                                                     cache=cache))
            re_dose = engine.dose_cube_host().astype(np.float32)
            stages["re-optimised"] = (re_dose, re_plan)
    finally:
        engine.set_fluences(original)
    step(3, "gamma")
    ref_body = np.where(body, ref, 0).astype(np.float64)
    gam, comp = {}, {}
    for name, (dose, _) in stages.items():
        ev = np.where(body, dose, 0).astype(np.float64)
        gam[name] = {}
        for dp, dta in ((3.0, 3.0), (2.0, 2.0)):
            g = gamma_index(axes, ref_body, axes, ev, dose_percent=dp, dta_mm=dta, cutoff_percent=10.0,
                            max_gamma=2.0, max_points=gamma_points, seed=seed)
            gam[name][f"{dp:g}%/{dta:g}mm"] = gamma_summary(g)
        step(4, "DVH metrics")
        comp[name] = compare_plans(ref, dose, engine.patient, prescription_gy=rx, labels=("fluence", name))
    step(6, "done")
    opts = {"tongue_groove_mm": float(tongue_groove_mm), "leaf_gap_mm": float(leaf_gap_mm), "gamma_points": gamma_points,
            "min_mu": min_mu,
            **(options or {})}
    return DeliverableCheck(ref, seq, re_dose, plan, re_plan, gam, comp, info, opts)
