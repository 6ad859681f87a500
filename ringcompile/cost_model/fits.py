"""Least-squares fits of measured times: non-negative coefficients, and t = alpha + bytes/W for links.

Shared by the one-level calibration (``calibrate``) and the two-level link measurement
(``calibrate_levels``), so neither imports the other.
"""

from __future__ import annotations

import torch


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares by active-set elimination on a tiny system (relative errors)."""
    A = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    w = 1 / b                     # fit relative error, so small shapes count as much as big ones
    active = list(range(A.shape[1]))
    x = torch.zeros(A.shape[1], dtype=torch.float64)
    while active:
        sol = torch.linalg.lstsq(A[:, active] * w[:, None], b * w).solution
        if (sol >= 0).all():
            x.zero_()
            x[active] = sol
            break
        active.pop(int(torch.argmin(sol)))
    return x.tolist()


def fit_link(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) fitted to t = alpha + bytes/W."""
    alpha, inv_w = _nnls([[1.0, float(n)] for n, _ in samples], [t for _, t in samples])
    small = min(t for _, t in samples)
    if inv_w <= 0:   # noise swamped the size dependence: fall back to the largest message's rate
        n_max, t_max = max(samples)
        inv_w = max(t_max - alpha, 0.5 * t_max) / n_max
    return (alpha if alpha > 0 else small), 1 / inv_w
