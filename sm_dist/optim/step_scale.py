"""The scale α of sm_adaptive's steps: whether a measured step is accepted, the retry after a
rise and the next α after an accepted step, from what the step changed (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

SCALE_RULES = ("fixed", "ratio", "secant")


class AcceptanceOptions(Protocol):
    """The options of sm_adaptive's (SMAdaptiveOptions) that judging a step reads."""

    accept_steps: bool
    accept_tolerance: float
    scale_rule: str
    step_scale: float
    scale_growth: float
    scale_max: float


@dataclass
class Decision:
    """What was decided about a measured step."""

    accept: bool
    scale: float  # α for the step (accepted: the next one's; rejected: the retry's)
    actual: float | None = None
    ratio: float | None = None


def judge_step(options: AcceptanceOptions, scale: float, before: float, after: float,
               model: float, slope: float) -> Decision:
    """The step α·d measured: loss `before` it and `after` it, its models' Σ L_s(d) `model`
    (at unit scale) and Σ g·d `slope`. A rise beyond `accept_tolerance` (or a non-finite loss)
    rejects it with a retry α; otherwise `scale_rule` gives the next α."""
    actual = after - before
    predicted = scale * model
    ratio = actual / predicted if predicted else None
    finite = math.isfinite(after)
    if options.accept_steps and (not finite or actual > options.accept_tolerance * abs(before)):
        return Decision(False, retry_scale(scale, actual if finite else None, slope), actual,
                        ratio)
    following = next_scale(options.scale_rule, scale, actual, slope, ratio,
                           start=options.step_scale, growth=options.scale_growth,
                           largest=options.scale_max)
    return Decision(True, following, actual, ratio)


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
