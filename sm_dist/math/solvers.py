"""Inner solvers for a local loss: truncated CG (resumable) and GD with Armijo (spec §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sm_dist.math.line_search import ArmijoRule, armijo_backtrack
from sm_dist.math.local_loss import LocalLoss


@dataclass
class SolverReport:
    """What an inner loop has done so far on one local loss."""

    steps: int  # inner steps taken (each one 𝓗 product)
    value: float  # L_s(d) at the current iterate
    stopped: str | None  # why the solver will take no more steps, or None


class TruncatedCG:
    """Conjugate gradient on 𝓗d = −g, in slices: `run(n)` continues the same run.

    Stops when ‖r‖ ≤ tol·‖g‖, or on non-positive curvature pᵀ𝓗p ≤ 0: at the first step it then
    takes one gradient step with an Armijo search on L_s instead; later it keeps the iterate.
    A NaN or infinite pᵀ𝓗p (the network has overflowed) stops it where it is.

    With a trust `radius` it is Steihaug-Toint CG: the iterate stays within ‖d‖ ≤ radius; a
    step that would leave the region, or a direction of non-positive curvature (used, not only
    stopped at), goes to its boundary and ends the run. `start` warm-starts it from a point
    (one 𝓗 product), pulled to within half the radius if it lies farther out (a start on the
    boundary would leave CG no room).
    The state (d, r, p, rᵀr) and 𝓗d live here between calls.
    """

    def __init__(self, loss: LocalLoss, *, tol: float, armijo: ArmijoRule,
                 fallback_step: float, radius: float | None = None,
                 start: torch.Tensor | None = None) -> None:
        self.loss = loss
        self.tol = tol
        self.armijo = armijo
        self.fallback_step = fallback_step
        self.radius = radius
        self.d = torch.zeros_like(loss.grad)
        self.hd = torch.zeros_like(loss.grad)
        self.grad_norm = math.sqrt(float(loss.grad @ loss.grad))
        if start is not None and float(start.norm()) > 0:
            scale = 1.0 if radius is None else min(1.0, 0.5 * radius / float(start.norm()))
            self.d = start * scale
            self.hd = loss.hvp(self.d)
        self.r = -loss.grad - self.hd
        self.p = self.r.clone()
        self.rr = float(self.r @ self.r)
        self.steps = 0
        self.stopped: str | None = "zero gradient" if self.rr == 0.0 else None

    def run(self, n: int) -> int:
        """Take up to n more CG steps; returns how many were taken."""
        taken = 0
        while taken < n and self.stopped is None:
            taken += self.advance(self.loss.hvp(self.p))
        return taken

    def advance(self, hp: torch.Tensor) -> int:
        """One CG step, given hp = 𝓗p for the current direction `p` (which the caller may have
        computed elsewhere: CGBlock's products come from pipeline passes); returns 0 or 1."""
        assert self.stopped is None, "the solver has stopped"
        curvature = float(self.p @ hp)
        if not math.isfinite(curvature):  # the iterate has overflowed: no step can help
            self.stopped = "non-finite curvature"
            return 0
        if curvature <= 0.0:
            if self.radius is not None:  # follow the direction of negative curvature out
                self._to_boundary(hp, "negative curvature")
                return 1
            taken = 0
            if self.steps == 0:
                self._gradient_fallback(hp)
                taken = 1
            self.stopped = "negative curvature"
            return taken
        alpha = self.rr / curvature
        if self.radius is not None and float((self.d + alpha * self.p).norm()) >= self.radius:
            self._to_boundary(hp, "trust radius")
            return 1
        self.d += alpha * self.p
        self.hd += alpha * hp
        self.r -= alpha * hp
        rr_next = float(self.r @ self.r)
        self.steps += 1
        if math.sqrt(rr_next) <= self.tol * self.grad_norm:
            self.stopped = "converged"
            return 1
        self.p = self.r + (rr_next / self.rr) * self.p
        self.rr = rr_next
        return 1

    def _to_boundary(self, hp: torch.Tensor, why: str) -> None:
        """d ← d + τp with τ ≥ 0 and ‖d + τp‖ = radius; the run ends there."""
        assert self.radius is not None
        a, b = float(self.p @ self.p), 2.0 * float(self.d @ self.p)
        c = float(self.d @ self.d) - self.radius ** 2
        tau = (-b + math.sqrt(max(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)
        self.d += tau * self.p
        self.hd += tau * hp
        self.steps += 1
        self.stopped = why

    def _gradient_fallback(self, hp: torch.Tensor) -> None:
        # p = −g here, so hp = 𝓗(−g): one Armijo step along −g on L_s costs no further product.
        phi = self.loss.line_value(self.d, self.hd, self.p, hp)
        result = armijo_backtrack(phi, phi(0.0), self.rr, self.fallback_step, self.armijo)
        if result.accepted:
            self.d += result.step * self.p
            self.hd += result.step * hp
        self.steps += 1

    def report(self) -> SolverReport:
        return SolverReport(self.steps, self.loss.value(self.d, self.hd), self.stopped)


class GradientDescentArmijo:
    """d ← d − α∇L_s(d) with an Armijo search on L_s; one 𝓗 product per step (𝓗d is tracked).

    With `fixed_step` the step is constant (no search). Otherwise the first trial step is
    `initial_step` and each later step starts from twice the last accepted one; `last_step`
    is read back by the caller to carry it into the next outer iteration.
    """

    def __init__(self, loss: LocalLoss, *, armijo: ArmijoRule, initial_step: float,
                 fixed_step: float | None = None) -> None:
        self.loss = loss
        self.armijo = armijo
        self.fixed_step = fixed_step
        self.next_step = initial_step
        self.last_step = initial_step / 2.0
        self.d = torch.zeros_like(loss.grad)
        self.hd = torch.zeros_like(loss.grad)
        self.steps = 0
        self.stopped: str | None = None

    def run(self, n: int) -> int:
        taken = 0
        while taken < n and self.stopped is None:
            grad = self.loss.gradient(self.d, self.hd)
            grad_sq = float(grad @ grad)
            if grad_sq == 0.0:
                self.stopped = "zero gradient"
                break
            h_grad = self.loss.hvp(grad)
            if self.fixed_step is not None:
                step = self.fixed_step
            else:
                phi = self.loss.line_value(self.d, self.hd, -grad, -h_grad)
                result = armijo_backtrack(phi, phi(0.0), grad_sq, self.next_step, self.armijo)
                if not result.accepted:
                    self.stopped = "line search failed"
                    break
                step = result.step
                self.last_step = step
                self.next_step = 2.0 * step
            self.d -= step * grad
            self.hd -= step * h_grad
            self.steps += 1
            taken += 1
        return taken

    def report(self) -> SolverReport:
        return SolverReport(self.steps, self.loss.value(self.d, self.hd), self.stopped)
