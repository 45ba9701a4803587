"""Armijo backtracking on a scalar function of the step size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ArmijoRule:
    """Sufficient decrease f(x − α∇) ≤ f(x) − c·α‖∇‖², backtracking α ← β·α."""

    c: float = 0.1
    beta: float = 0.9
    max_backtracks: int = 500


@dataclass
class ArmijoResult:
    step: float
    value: float
    trials: int  # evaluations of the function, each one pipeline pass for GD+Armijo
    accepted: bool


def armijo_backtrack(phi: Callable[[float], float], f0: float, grad_sq: float, step: float,
                     rule: ArmijoRule) -> ArmijoResult:
    """Largest α = step·β^k (k ≥ 0) with φ(α) ≤ f0 − c·α·‖∇‖²; not accepted after max_backtracks.

    NaN or inf values count as failures of the test, so a step that overflows backtracks.
    """
    for trial in range(1, rule.max_backtracks + 1):
        value = phi(step)
        if value <= f0 - rule.c * step * grad_sq:  # False for NaN
            return ArmijoResult(step, value, trial, True)
        step *= rule.beta
    return ArmijoResult(step, f0, rule.max_backtracks, False)
