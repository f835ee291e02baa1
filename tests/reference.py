"""Independent high-precision reference for the mixture CDF map (mpmath).

Tests compare the library against this; it shares no code with the package.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 30


def _mixture(params):
    logits, means, log_scales = (np.asarray(p, dtype=np.float64) for p in params)
    log_norm = mp.log(mp.fsum(mp.exp(mp.mpf(v)) for v in logits))
    weights = [mp.exp(mp.mpf(v) - log_norm) for v in logits]
    return weights, [mp.mpf(v) for v in means], [mp.exp(mp.mpf(v)) for v in log_scales]


def forward(x, params):
    """Returns float64 arrays ``(y, log_det)`` for 1-D params ``[K]`` and 1-D ``x``."""
    weights, means, scales = _mixture(params)
    ys, log_dets = [], []
    for value in np.asarray(x, dtype=np.float64).ravel():
        xv = mp.mpf(float(value))
        lower = mp.fsum(
            w * mp.ncdf((xv - m) / s) for w, m, s in zip(weights, means, scales)
        )
        upper = mp.fsum(
            w * mp.ncdf((m - xv) / s) for w, m, s in zip(weights, means, scales)
        )
        density = mp.fsum(
            w * mp.npdf((xv - m) / s) / s for w, m, s in zip(weights, means, scales)
        )
        tail = min(lower, upper)
        y = _normal_quantile(tail)
        if upper < lower:
            y = -y
        ys.append(float(y))
        log_dets.append(float(mp.log(density) - mp.log(mp.npdf(y))))
    return np.array(ys), np.array(log_dets)


def _normal_quantile(p):
    """Φ⁻¹(p) for p ≤ 1/2 to full working precision (Newton on log Φ)."""
    log_p = mp.log(p)
    y = -mp.sqrt(-2 * log_p)
    if p > mp.mpf("1e-10"):
        y = mp.mpf(-1) if p < 0.3 else mp.mpf(0)
    for _ in range(200):
        step = (mp.log(mp.ncdf(y)) - log_p) * mp.ncdf(y) / mp.npdf(y)
        y -= step
        if abs(step) < mp.mpf(10) ** (-25) * max(1, abs(y)):
            break
    return y
