"""What the optimizers with an inner loop per stage share (SM, sm_adaptive, CGBlock, SSO): the
action that builds a stage's local model, the stage report of an inner loop, and the metrics
section it fills."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sm_dist.optim.base import StageReport
from sm_dist.optim.metrics import OptimizerMetrics, metric
from sm_dist.pipeline.actions import UPDATE_COLOUR, ActionKind, Direction, register_kind

BUILD = register_kind(ActionKind("L", "build local loss", Direction.LOCAL, "update",
                                 UPDATE_COLOUR, "update", after_backward=True))


@dataclass
class InnerLoopReport(StageReport):
    """One stage's inner loop this iteration."""

    inner_steps: int = 0
    local_loss: float | None = None  # the model's value at the step taken
    curvature_sent: float | None = None  # the largest c this stage sent down
    psi_products: int = 0  # Hessian-vector products of Ψ this iteration, backward included
    stopped: str | None = None  # why the inner solver stopped early, if it did

    def merged(self, replicas: list[StageReport]) -> StageReport:
        """Replica 0's with the largest curvature sent and, where the replicas' local losses
        differ (replica_mode average_steps), their mean."""
        changes: dict[str, Any] = {}
        sent = [r.curvature_sent for r in replicas
                if isinstance(r, InnerLoopReport) and r.curvature_sent is not None]
        if sent:
            changes["curvature_sent"] = max(sent)
        values = [r.local_loss for r in replicas
                  if isinstance(r, InnerLoopReport) and r.local_loss is not None]
        if values and len(set(values)) > 1:
            changes["local_loss"] = sum(values) / len(values)
        return replace(self, **changes)


def steps_text(steps: float) -> str:
    """A count of inner steps, or its mean to a tenth of a step."""
    return f"{steps:.0f}" if steps == round(steps) else f"{steps:.1f}"


@dataclass
class InnerLoopMetrics(OptimizerMetrics):
    """Per stage: the inner steps taken, the local model's value at the step, the largest
    curvature sent down, Ψ's Hessian-vector products, and why the inner loop stopped early."""

    inner_steps: list[int] | None = metric("inner", format=steps_text, heading="inner steps",
                                           per_stage=True, line=True, column=True, mean=True)
    local_loss: list[float | None] | None = metric("local loss", format="+.3e",
                                                   per_stage=True, column=True)
    curvature: list[float | None] | None = metric("curvature sent", format=".3e",
                                                  per_stage=True, column=True)
    psi_products: list[int] | None = metric("Ψ products", per_stage=True)
    inner_stopped: list[str | None] | None = metric("stopped", per_stage=True)


def inner_loop_fields(reports: list[StageReport]) -> dict[str, Any]:
    """The record fields of the inner loops of every stage."""
    loops = [r if isinstance(r, InnerLoopReport) else InnerLoopReport() for r in reports]
    values = [r.local_loss for r in loops]
    return {
        "predicted_decrease": sum(v for v in values if v is not None),
        "inner_steps": [r.inner_steps for r in loops],
        "local_loss": values,
        "curvature": [r.curvature_sent for r in loops],
        "psi_products": [r.psi_products for r in loops],
        "inner_stopped": [r.stopped for r in loops],
    }
