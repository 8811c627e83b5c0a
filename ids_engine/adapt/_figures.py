"""Pictures of an adaptation (matplotlib without pyplot state; None when it is missing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ids_engine.evaluation._report import _load_matplotlib, finish_dvh_axes

__all__ = ["adapt_dvh_png", "isodose_slice_png"]

ISODOSE_PCT = (50.0, 80.0, 95.0, 107.0)
_ISODOSE_COLOURS = ("#2060ff", "#20c040", "#ffa000", "#ff2020")


def adapt_dvh_png(path, *, approved_dose_gy, approved_patient, recomputed_dose_gy, adapted_dose_gy, new_patient,
                  prescription_gy: float, title: str = "", adapted_label: str = "adapted") -> Path | None:
    """Cumulative DVHs of the approved plan (planning anatomy, dashed), the approved plan
    recomputed on the new anatomy (dotted) and the adapted plan (new anatomy, solid), each
    structure in its colour (body left out)."""
    from ids_engine.evaluation import dvh

    mpl = _load_matplotlib()
    if mpl is None:
        return None
    Figure, Canvas = mpl
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    Canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s in approved_patient.structures:
        if s.is_empty or s.kind.value == "external" or s.name not in new_patient.structure_names:
            continue
        n = new_patient.structure(s.name)
        curves = [(approved_dose_gy, s, "--", "approved")]
        if not n.is_empty:
            curves += [(recomputed_dose_gy, n, ":", "recomputed"), (adapted_dose_gy, n, "-", adapted_label)]
        for dose, st, style, what in curves:
            h = dvh(st.name, np.asarray(dose, np.float64), st.mask, st.grid.voxel_volume_cc)
            ax.plot(h.dose_gy, 100.0 * h.volume_fraction, style, color=s.colour, linewidth=1.4, label=f"{s.name} {what}")
    ax.axvline(prescription_gy, color="0.4", linewidth=0.8, linestyle="-.", label=f"Rx {prescription_gy:g} Gy")
    finish_dvh_axes(ax, legend_fontsize=7)
    ax.set_title(title or "DVH: approved (dashed), recomputed (dotted), adapted (solid)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def isodose_slice_png(path, *, new_patient, doses: dict, prescription_gy: float, slice_index: int | None = None,
                      title: str = "") -> Path | None:
    """Axial slices of the new CT with isodose lines (50, 80, 95, 107 % of Rx) of each dose
    in ``doses`` (label -> (z, y, x) Gy on the new grid) and the structures' outlines; the
    slice through the first target's centroid unless ``slice_index``."""
    mpl = _load_matplotlib()
    if mpl is None:
        return None
    Figure, Canvas = mpl
    g = new_patient.grid
    if slice_index is None:
        tg = [s for s in new_patient.targets if not s.is_empty]
        slice_index = (int(np.rint(g.world_to_index(tg[0].centroid_xyz())[0])) if tg
                       else g.shape_zyx[0] // 2)
    k = int(np.clip(slice_index, 0, g.shape_zyx[0] - 1))
    x, y = g.axis_mm("x"), g.axis_mm("y")
    extent = (x[0], x[-1], y[-1], y[0])
    fig = Figure(figsize=(4.2 * len(doses), 4.2), dpi=100)
    Canvas(fig)
    for i, (label, dose) in enumerate(doses.items()):
        ax = fig.add_subplot(1, len(doses), i + 1)
        ax.imshow(new_patient.ct_hu[k], cmap="gray", vmin=-400, vmax=400, extent=extent, interpolation="nearest")
        d = np.asarray(dose, np.float64)[k]
        levels = [p / 100.0 * prescription_gy for p in ISODOSE_PCT]
        if d.max() >= levels[0]:
            ax.contour(x, y, d, levels=levels, colors=_ISODOSE_COLOURS, linewidths=1.0)
        for s in new_patient.structures:
            if s.kind.value != "external" and s.mask[k].any():
                ax.contour(x, y, s.mask[k].astype(float), levels=[0.5], colors=[s.colour], linewidths=0.8,
                           linestyles="dashed")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("x (mm)")
        if i == 0:
            ax.set_ylabel("y (mm)")
    fig.suptitle(title or f"axial slice {k} (z = {g.axis_mm('z')[k]:.1f} mm); isodoses "
                 + ", ".join(f"{p:g} %" for p in ISODOSE_PCT) + " of Rx", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
