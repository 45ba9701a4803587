"""The options every optimizer shares; each optimizer module adds its own (see registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sm_dist.math.line_search import ArmijoRule

# Validation rules live in field metadata, where the validator and docs tests read them:
#   choices (allowed strings); min / gt / max / lt
#   (numeric >=, >, <=, <; applied to every item of a list); length (list size).


@dataclass(kw_only=True)
class InnerStepsConfig:
    """Inner steps when stages fill the pipeline's bubbles (spec §5): at least `min` each,
    then more while the stage would otherwise wait for its next input, at most `max`."""
    min: int = field(metadata={"min": 1, "example": "10"})
    max: int = field(metadata={"min": 1, "example": "100"})
    fill_bubbles: bool = True


@dataclass(kw_only=True)
class OptimizerOptions:
    """Options more than one optimizer reads: inner steps, step sizes, Armijo's rule."""
    name: str = "sm"  # the composed OptimizerConfig gives it the registry's choices
    # A fixed count (bit-reproducible), or {min, max, fill_bubbles} to fill the idle time.
    inner_steps: int | InnerStepsConfig = field(default=20, metadata={"min": 1})
    # A fixed step for SM's gradient inner solver and SSO's inner steps; None = Armijo search.
    inner_lr: float | None = field(default=None, metadata={"gt": 0})
    cg_tol: float = field(default=1e-10, metadata={"min": 0})
    armijo_c: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    armijo_beta: float = field(default=0.9, metadata={"gt": 0, "lt": 1})
    armijo_init: float = field(default=1.0, metadata={"gt": 0})
    lr: float = field(default=0.01, metadata={"gt": 0})
    momentum: float = field(default=0.0, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"length": 2, "min": 0, "lt": 1})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    # With model.replicas > 1: exact (the replicas sum every gradient and product: one
    # pipeline's iterates), or average_steps (SM: each replica minimises its own local loss
    # and the replicas average the steps, one all-reduce per iteration).
    replica_mode: str = field(default="exact", metadata={"choices": ("exact", "average_steps")})

    def armijo_rule(self) -> ArmijoRule:
        """The sufficient-decrease rule of every Armijo search (spec's c and β)."""
        return ArmijoRule(c=self.armijo_c, beta=self.armijo_beta)


def check_inner_steps(options: OptimizerOptions) -> list[str]:
    """The inner-steps section's own consistency (whatever the optimizer)."""
    steps = options.inner_steps
    if isinstance(steps, InnerStepsConfig) and steps.max < steps.min:
        return [f"optimizer.inner_steps.max: max {steps.max} is below min {steps.min}; "
                "set max >= min"]
    return []


def fixed_inner_steps(options: OptimizerOptions) -> list[str]:
    """For optimizers whose inner steps are pipeline passes: no bubbles to fill."""
    if isinstance(options.inner_steps, InnerStepsConfig):
        return [f"optimizer.inner_steps: {options.name} needs a fixed number of inner steps "
                "(its steps are pipeline passes, so there are no bubbles to fill); set e.g. "
                "optimizer.inner_steps: 10"]
    return []
