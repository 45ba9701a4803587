"""Where each stage's replicas live: the job's ranks laid out stage-major, and their names.

Rank = stage · R + replica. With `--nproc-per-node` a multiple of R, the R replicas of a stage
sit on one node, so the all-reduces among them (one per inner step in exact mode) stay on it
and only the activations and gradients between stages cross nodes. Rank 0 (stage 0, replica 0)
also runs the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """A job of `stages` pipeline stages, each run by `replicas` processes."""

    stages: int
    replicas: int = 1

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def rank(self, stage: int, replica: int = 0) -> int:
        return stage * self.replicas + replica

    def stage_of(self, rank: int) -> int:
        return rank // self.replicas

    def replica_of(self, rank: int) -> int:
        return rank % self.replicas

    def group(self, stage: int) -> list[int]:
        """The ranks of one stage's replicas: its process group."""
        return [self.rank(stage, r) for r in range(self.replicas)]

    def name(self, rank: int) -> str:
        """'stage 1' alone, 'stage 1 replica 0' with replicas (what messages call a rank)."""
        stage = f"stage {self.stage_of(rank)}"
        return stage if self.replicas == 1 else f"{stage} replica {self.replica_of(rank)}"


SINGLE = Layout(1)
