"""Photon machine model for the Bortfeld SVD pencil beam.

Dose per unit fluence at radiological depth ``l`` and BEV position ``(u, v)`` is
(eq. 4-5 of the IDS paper, Bortfeld, Schlegel and Rhein 1993)::

    D(u, v, l) = ISQ * sum_c D_c(l) * (psi conv w_c)(u, v)

with three components ``c``. The depth components have the analytic form used by
Bortfeld et al. and by matRad's photon machines::

    D_c(l) = a_c * beta_c / (beta_c - m) * (exp(-m l) - exp(-beta_c l))

(``m`` the primary attenuation coefficient, ``beta_c`` the build-up coefficient of
component c, ``a_c`` its weight), and the lateral kernels ``w_c`` are radial profiles
in 1/mm^2 that integrate to one over the plane. ``ISQ = (SAD / distance)^2``.

Component 0 is the primary (narrow: source size and electron transport), components
1 and 2 are phantom scatter (broad). The engine evaluates the narrow component on
the CT grid and the broad ones on a coarser grid (see ``_engine``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._mlc import MLC, default_mlc

__all__ = ["PhotonMachine", "default_6mv"]


@dataclass(frozen=True, eq=False)
class PhotonMachine:
    """A photon beam model (plain data; nothing about it is hard-coded in the kernels).

    Parameters
    ----------
    name : machine name.
    energy_mv : nominal energy.
    sad_mm : source-axis distance.
    attenuation_per_mm : ``m``, primary attenuation coefficient in water, 1/mm.
    betas_per_mm : ``beta_c`` for the three components, 1/mm.
    weights : ``a_c`` for the three components (relative; absolute scale set by calibration).
    kernel_radius_mm : (nr,) radii at which the lateral kernels are tabulated, from 0, increasing.
    kernels_per_mm2 : (3, nr) radial lateral kernel profiles, 1/mm^2, each integrating to ~1.
    source : where the data come from (for reports).
    narrow_components : components the engine evaluates on the CT grid; the others are
        smooth (broad scatter) and are evaluated on a coarser grid. The default model keeps
        only the primary narrow; SVD machines whose components all mix primary and scatter
        (matRad) list all three.
    kernel_pixel_mm : None for smooth radial profiles (sampled at the engine's cell centres);
        otherwise the kernels are pixel values on a square grid of this spacing with a pixel
        centred at r = 0 (matRad's convention, 0.5 mm, with a sharp peak in that pixel), and
        the engine bins those pixels' mass into its cells.
    gy_per_mu : absolute calibration: Gy per unit fluence (1 MU) in the reference condition
        (see :func:`ids_engine.dose.calibrate`); None until calibrated.
    kernel_ssds_mm : SSDs (mm) at which the machine tabulates its lateral kernels (matRad
        machines carry one set per SSD); empty for a machine with one SSD-independent set.
    kernel_sets_per_mm2 : (ns, 3, nr) the kernel sets, one per ``kernel_ssds_mm`` entry, in
        the same units and convention as ``kernels_per_mm2``; None when ``kernel_ssds_mm`` is
        empty.
    kernel_ssd_mm : the SSD of the set in ``kernels_per_mm2`` (None for an SSD-independent
        machine). The dose engine uses, per beam, :meth:`for_ssd` of the beam's central-axis
        SSD, as matRad does.
    mlc : the machine's multileaf collimator (None: none modelled; planning tools then use
        :func:`~ids_engine.model.default_mlc`).
    """

    name: str
    energy_mv: float
    sad_mm: float
    attenuation_per_mm: float
    betas_per_mm: tuple[float, float, float]
    weights: tuple[float, float, float]
    kernel_radius_mm: np.ndarray
    kernels_per_mm2: np.ndarray
    source: str = ""
    narrow_components: tuple[int, ...] = (0,)
    kernel_pixel_mm: float | None = None
    gy_per_mu: float | None = None
    meta: dict = field(default_factory=dict)
    kernel_ssds_mm: tuple[float, ...] = ()
    kernel_sets_per_mm2: np.ndarray | None = None
    kernel_ssd_mm: float | None = None
    mlc: MLC | None = None

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas_per_mm)
        weights = tuple(float(w) for w in self.weights)
        if len(betas) != 3 or len(weights) != 3:
            raise ValueError("PhotonMachine: betas_per_mm and weights need three components")
        m = float(self.attenuation_per_mm)
        if not m > 0:
            raise ValueError(f"PhotonMachine.attenuation_per_mm must be positive, got {m}")
        if any(abs(b - m) < 1e-12 or b <= 0 for b in betas):
            raise ValueError("PhotonMachine.betas_per_mm must be positive and differ from attenuation_per_mm")
        r = np.asarray(self.kernel_radius_mm, dtype=np.float64)
        k = np.asarray(self.kernels_per_mm2, dtype=np.float64)
        if r.ndim != 1 or r.size < 2 or r[0] != 0 or np.any(np.diff(r) <= 0):
            raise ValueError("PhotonMachine.kernel_radius_mm must start at 0 and increase")
        if k.shape != (3, r.size):
            raise ValueError(f"PhotonMachine.kernels_per_mm2 must have shape (3, {r.size}), got {k.shape}")
        narrow = tuple(sorted({int(c) for c in self.narrow_components}))
        if not narrow or any(c not in (0, 1, 2) for c in narrow):
            raise ValueError(f"PhotonMachine.narrow_components must be a non-empty subset of (0, 1, 2), got {self.narrow_components!r}")
        object.__setattr__(self, "narrow_components", narrow)
        if self.sad_mm <= 0:
            raise ValueError("PhotonMachine.sad_mm must be positive")
        ssds = tuple(float(v) for v in self.kernel_ssds_mm)
        if ssds:
            sets = np.asarray(self.kernel_sets_per_mm2, dtype=np.float64)
            if sets.shape != (len(ssds), 3, r.size):
                raise ValueError(f"PhotonMachine.kernel_sets_per_mm2 must have shape ({len(ssds)}, 3, {r.size}), "
                                 f"got {sets.shape}")
            if not all(np.isfinite(v) and v > 0 for v in ssds):
                raise ValueError(f"PhotonMachine.kernel_ssds_mm must be positive, got {ssds}")
            if self.kernel_ssd_mm is None or float(self.kernel_ssd_mm) not in ssds:
                raise ValueError(f"PhotonMachine.kernel_ssd_mm must be one of kernel_ssds_mm {ssds}, "
                                 f"got {self.kernel_ssd_mm}")
            sets.setflags(write=False)
            object.__setattr__(self, "kernel_sets_per_mm2", sets)
            object.__setattr__(self, "kernel_ssd_mm", float(self.kernel_ssd_mm))
        elif self.kernel_sets_per_mm2 is not None:
            raise ValueError("PhotonMachine.kernel_sets_per_mm2 needs kernel_ssds_mm")
        object.__setattr__(self, "kernel_ssds_mm", ssds)
        r.setflags(write=False)
        k.setflags(write=False)
        object.__setattr__(self, "attenuation_per_mm", m)
        object.__setattr__(self, "betas_per_mm", betas)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "kernel_radius_mm", r)
        object.__setattr__(self, "kernels_per_mm2", k)

    # ------------------------------------------------------------ depth
    def depth_components(self, depth_mm, components=(0, 1, 2)) -> np.ndarray:
        """``D_c(l)`` evaluated analytically: (len(components), ...) float64, per unit fluence
        before calibration.

        Parameters
        ----------
        depth_mm : array of radiological depths, mm (any shape); negative depths (outside
            the patient) give 0.
        components : which components, in this order (default all three).
        """
        l = np.clip(np.asarray(depth_mm, dtype=np.float64), 0.0, None)
        m = self.attenuation_per_mm
        primary = np.exp(-m * l)
        out = np.empty((len(components),) + l.shape)
        for i, c in enumerate(components):
            a, b = self.weights[c], self.betas_per_mm[c]
            out[i] = a * b / (b - m) * (primary - np.exp(-b * l))
        return out

    def depth_table(self, max_depth_mm: float = 600.0, rel_tol: float = 2.5e-4) -> tuple[np.ndarray, np.ndarray]:
        """Depth components on a non-uniform table for linear interpolation: (depth_mm (nd,),
        values (3, nd)) float64.

        The nodes are refined by bisection until linear interpolation matches
        :meth:`depth_components` to ``rel_tol`` of the local value of every component at the
        quarter, half and three-quarter points of every interval (the largest error of linear
        interpolation between nodes sits near the middle; on the first interval, where
        ``D_c(l) ~ l (1 - (beta_c + m) l / 2)``, the relative error grows to at most 4/3 of its
        quarter-point value as ``l -> 0``). The build-up (beta_c up to ~0.3/mm) needs
        micrometre steps next to the surface and half-millimetre ones beyond ~20 mm; a
        uniform 0.5 mm table was 0.6 % low at 1.25 mm and 3 % low at 0.25 mm. The engine
        evaluates the formula directly; the table serves lookups on the device (TPI).
        """
        nodes = np.linspace(0.0, max_depth_mm, int(np.ceil(max_depth_mm / 0.5)) + 1)
        probe = np.array([0.25, 0.5, 0.75])
        for _ in range(60):
            a, b = nodes[:-1], nodes[1:]
            x = a[:, None] + probe[None, :] * (b - a)[:, None]
            va, vb = self.depth_components(a), self.depth_components(b)
            interp = va[:, :, None] * (1 - probe) + vb[:, :, None] * probe
            exact = self.depth_components(x)
            bad = np.any(np.abs(interp - exact) > rel_tol * np.abs(exact), axis=(0, 2))
            if not bad.any():
                break
            nodes = np.sort(np.concatenate([nodes, 0.5 * (a[bad] + b[bad])]))
        else:  # pragma: no cover - needs betas beyond ~1e15 / mm
            raise ValueError(f"depth_table: no table within {rel_tol:g} after 60 refinements")
        return nodes, self.depth_components(nodes)

    # ----------------------------------------------------------- kernels
    def kernel_at(self, component: int, radius_mm) -> np.ndarray:
        """Lateral kernel ``w_c(r)`` in 1/mm^2 (0 beyond the tabulated radius)."""
        r = np.asarray(radius_mm, dtype=np.float64)
        return np.interp(r, self.kernel_radius_mm, self.kernels_per_mm2[component], right=0.0)

    def kernel_reach_mm(self, component: int, fraction: float = 1e-4) -> float:
        """Radius beyond which the kernel is below ``fraction`` of its peak (or the table ends)."""
        k = self.kernels_per_mm2[component]
        above = np.nonzero(k >= fraction * k.max())[0]
        return float(self.kernel_radius_mm[above[-1]]) if above.size else float(self.kernel_radius_mm[-1])

    def nearest_kernel_ssd_mm(self, ssd_mm: float) -> float | None:
        """The tabulated kernel SSD nearest ``ssd_mm`` (the first on a tie, as matRad's ``min``);
        None for an SSD-independent machine."""
        if not self.kernel_ssds_mm:
            return None
        return self.kernel_ssds_mm[int(np.argmin(np.abs(np.asarray(self.kernel_ssds_mm) - float(ssd_mm))))]

    def for_ssd(self, ssd_mm: float) -> "PhotonMachine":
        """This machine with the kernel set tabulated nearest ``ssd_mm`` in ``kernels_per_mm2``
        (matRad's nearest-neighbour rule; itself for an SSD-independent machine). Depth
        components and calibration are shared by all sets."""
        pick = self.nearest_kernel_ssd_mm(ssd_mm)
        if pick is None or pick == self.kernel_ssd_mm:
            return self
        from dataclasses import replace

        i = self.kernel_ssds_mm.index(pick)
        return replace(self, kernels_per_mm2=self.kernel_sets_per_mm2[i], kernel_ssd_mm=pick)

    @property
    def broad_components(self) -> tuple[int, ...]:
        return tuple(c for c in (0, 1, 2) if c not in self.narrow_components)

    def with_calibration(self, gy_per_mu: float) -> "PhotonMachine":
        from dataclasses import replace

        return replace(self, gy_per_mu=float(gy_per_mu))


def default_6mv() -> PhotonMachine:
    """ids-engine's own generic 6 MV photon model (not commissioned data).

    Parameter forms follow Bortfeld, Schlegel and Rhein, Med. Phys. 20 (1993) 311:
    depth components ``a_c beta_c/(beta_c - m) (exp(-m l) - exp(-beta_c l))`` and lateral
    kernels built from a narrow Gaussian (primary: source size, electron range), a
    broad Gaussian (near scatter) and an exponential-over-radius profile (far scatter).

    The numbers are fitted (least squares, through the engine's own axis-dose formula, the
    one :func:`ids_engine.dose.calibrate` uses) to typical clinical 6 MV water data at SSD
    100 cm, i.e. the beam quality %dd(10) = 67 % of the megavoltage tables of BJR Supplement
    25 (1996), which are indexed by that quality:

    - 10 x 10: dmax 15 mm; PDD 86.5 % at 5 cm, 66.7 % at 10 cm, 38.6 % at 20 cm
      (this model: 15.0 mm; 86.5, 66.7, 38.6 %);
    - PDD(10 cm) of 5 x 5 and 20 x 20: 63 and 70.5 % (63.0, 70.5 %);
    - phantom scatter factor Sp at dmax, 5 x 5 and 20 x 20 relative to 10 x 10: 0.975 and
      1.025 (0.975, 1.025).

    PDD(20)/PDD(10) = 0.579 gives TPR20,10 = 0.673 by the IAEA TRS-398 relation
    TPR20,10 = 1.2661 PDD20,10 - 0.0595, the usual quality of a 6 MV beam. 80-20 %
    penumbra about 5-6 mm at 10 cm. Not modelled: head scatter (so output factors are
    phantom scatter only) and contaminant electrons (so the surface dose is low and dmax
    grows slightly with field size, 14 mm at 5 x 5 to 16 mm at 20 x 20, where clinical
    beams show the opposite). The earlier parameters (m 0.0047/mm, betas 0.27, 0.045,
    0.018/mm) gave PDD(10) = 69.4 % and dmax 17.5 mm. Replace the model with commissioned
    data (e.g. a matRad machine file) for anything clinical.
    """
    m = 0.00465
    betas = (0.29, 0.0435, 0.0071)
    weights = (1.0, 0.084, 0.43)
    r = np.arange(0.0, 200.0 + 0.25, 0.25)
    s0 = 2.6  # mm, primary Gaussian sigma at the isocentre plane
    s1 = 38.5  # mm, near-scatter Gaussian sigma
    lam = 84.0  # mm, far-scatter exponential length
    k0 = np.exp(-(r**2) / (2 * s0**2)) / (2 * np.pi * s0**2)
    k1 = np.exp(-(r**2) / (2 * s1**2)) / (2 * np.pi * s1**2)
    # exp(-r/lam)/r kernel, regularised at r=0 over half a millimetre; normalised below.
    k2 = np.exp(-r / lam) / np.maximum(r, 0.5)
    kernels = np.stack([k0, k1, k2])
    # Normalise each to unit integral over the plane (trapezoid in r, 2*pi*r dr).
    for k in kernels:
        k /= np.trapezoid(2 * np.pi * r * k, r)
    return PhotonMachine(
        name="ids-generic-6MV",
        energy_mv=6.0,
        sad_mm=1000.0,
        attenuation_per_mm=m,
        betas_per_mm=betas,
        weights=weights,
        kernel_radius_mm=r,
        kernels_per_mm2=kernels,
        source="ids-engine generic analytic 6 MV model (Bortfeld 1993 parameter forms)",
        mlc=default_mlc(),
    )
