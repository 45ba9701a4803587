"""The scale α of sm_adaptive's steps: the retry after a rise and the next α after an accepted
step, from what a measured step changed (pure functions of scalars)."""

from __future__ import annotations

SCALE_RULES = ("fixed", "ratio", "secant")


def line_minimum(scale: float, actual: float, slope: float) -> float | None:
    """α* of the parabola along d through h(0) with slope Σ g·d and the measured change
    `actual` = h(scale·d) − h(0); None when it has no minimum ahead (not convex, or d uphill)."""
    curvature = 2.0 * (actual - scale * slope) / (scale * scale)
    return -slope / curvature if curvature > 0 and slope < 0 else None


def retry_scale(scale: float, actual: float | None, slope: float) -> float:
    """A smaller α after a rise (or a non-finite loss: `actual` None): the line minimum, kept
    within [α/10, α/2] (safeguarded interpolation, as in backtracking line searches)."""
    best = None if actual is None else line_minimum(scale, actual, slope)
    return scale / 2 if best is None else min(max(best, scale / 10), scale / 2)


def next_scale(rule: str, scale: float, actual: float, slope: float, ratio: float | None, *,
               start: float, growth: float, largest: float) -> float:
    """α for the next step after an accepted one measured at `scale`.

    fixed: back to `start`. ratio: Levenberg-Marquardt on actual/predicted as in Martens (2010,
    §4.1), ×3/2 above 3/4 and ×2/3 below 1/4. secant: the line minimum the measurement implies
    (a linear loss along d: grow), within ×/÷ `growth` of `scale`. Never above `largest`.
    """
    if rule == "fixed":
        proposal = start
    elif rule == "ratio":
        proposal = scale if ratio is None else scale * (1.5 if ratio > 0.75 else
                                                        2 / 3 if ratio < 0.25 else 1.0)
    else:
        best = line_minimum(scale, actual, slope)
        proposal = scale * growth if best is None else best
        proposal = min(max(proposal, scale / growth), scale * growth)
    return min(proposal, largest)
