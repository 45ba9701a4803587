"""The optimizer section's shared base and the option groups several optimizers take; each
optimizer's own `Options` combines them with its own (see registry)."""

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
    """What every optimizer's section has: its name, and how data-parallel replicas step."""
    name: str = "sm"  # the registry's names are the schema's choices (config/job.py)
    # With model.replicas > 1: exact (the replicas sum every gradient and product: one
    # pipeline's iterates), or average_steps (SM: each replica minimises its own local loss
    # and the replicas average the steps, one all-reduce per iteration).
    replica_mode: str = field(default="exact", metadata={"choices": ("exact", "average_steps")})

    def settle(self, minibatches: bool) -> None:
        """Choose the options left null that depend on whether the batch changes every
        iteration; the job is then written (config.yaml) with the choice."""


@dataclass(kw_only=True)
class InnerLoopOptions(OptimizerOptions):
    """Optimizers with an inner loop per iteration (SM, CGBlock, SSO)."""
    # A fixed count (bit-reproducible), or {min, max, fill_bubbles} to fill the idle time.
    inner_steps: int | InnerStepsConfig = field(default=20, metadata={"min": 1})


@dataclass(kw_only=True)
class ArmijoOptions(OptimizerOptions):
    """Armijo's sufficient-decrease rule, for an optimizer's line searches."""
    armijo_c: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    armijo_beta: float = field(default=0.9, metadata={"gt": 0, "lt": 1})
    armijo_init: float = field(default=1.0, metadata={"gt": 0})

    def armijo_rule(self) -> ArmijoRule:
        """The sufficient-decrease rule of every Armijo search (spec's c and β)."""
        return ArmijoRule(c=self.armijo_c, beta=self.armijo_beta)


@dataclass(kw_only=True)
class LearningRateOptions(OptimizerOptions):
    """A constant learning rate (what `compare --lrs` sweeps)."""
    lr: float = field(default=0.01, metadata={"gt": 0})


def check_inner_steps(options: InnerLoopOptions) -> list[str]:
    """The inner-steps section's own consistency."""
    steps = options.inner_steps
    if isinstance(steps, InnerStepsConfig) and steps.max < steps.min:
        return [f"optimizer.inner_steps.max: max {steps.max} is below min {steps.min}; "
                "set max >= min"]
    return []


def fixed_inner_steps(options: InnerLoopOptions) -> list[str]:
    """For optimizers whose inner steps are pipeline passes: no bubbles to fill."""
    if isinstance(options.inner_steps, InnerStepsConfig):
        return [f"optimizer.inner_steps: {options.name} needs a fixed number of inner steps "
                "(its steps are pipeline passes, so there are no bubbles to fill); set e.g. "
                "optimizer.inner_steps: 10"]
    return []
