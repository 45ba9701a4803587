"""Data-parallel replicas of the pipeline, from the coordinator's side: each replica's share of
a pass's plan, and the replicas' results merged into one result per stage.

Every replica of a stage runs the same actions on its share of the data: replica r takes the
r-th part of every microbatch (F, and the T trials, which see the same samples) and of every
evaluation chunk (E), so that its microbatch j is part of one pipeline's microbatch j and
what SM takes per microbatch (a largest curvature, the power iteration's random starts) can
be the same. The loss's 1/n stays the whole batch's, so the replicas' sums are the single
pipeline's sums.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from sm_dist.pipeline.actions import FORWARD, TRIAL, ActionKind
from sm_dist.pipeline.executor import Plan, PlanResult

# Kinds whose pieces are the batch's microbatches: each must give every replica a sample.
BATCH_KINDS = (FORWARD, TRIAL)


class ReplicaSplitError(ValueError):
    """A batch that does not split evenly across the replicas."""


def _shares(pieces: dict[tuple[ActionKind, int], Tensor], replicas: int) -> list[dict]:
    """Each replica's pieces of one plan's inputs (or labels), under the same keys: replica r
    takes the r-th of `replicas` consecutive parts of every microbatch (and chunk)."""
    out: list[dict[tuple[ActionKind, int], Tensor]] = [{} for _ in range(replicas)]
    for key, piece in pieces.items():
        if key[0] in BATCH_KINDS and len(piece) < replicas:
            raise ReplicaSplitError(
                f"a microbatch of {len(piece)} samples cannot give each of {replicas} replicas "
                "(model.replicas) a sample; use fewer data.microbatches or a larger batch")
        for r, part in enumerate(torch.tensor_split(piece, replicas)):
            out[r][key] = part
    return out


def split_plan(plan: Plan, replicas: int) -> list[Plan]:
    """One plan per replica of the stage; a command's arguments go to each (a checkpoint's
    state: the replica's own, see `replica_state`)."""
    inputs, labels = _shares(plan.inputs, replicas), _shares(plan.labels, replicas)
    plans = []
    for r in range(replicas):
        command = plan.command
        if command is not None and command.method == "restore_checkpoint":
            command = dataclasses.replace(command, args=(replica_state(command.args[0], r),))
        plans.append(dataclasses.replace(plan, inputs=inputs[r], labels=labels[r],
                                         command=command))
    return plans


def replica_state(state: dict[str, Any], replica: int) -> dict[str, Any]:
    """Replica `replica`'s checkpoint state from the stage's merged one: the parameters are
    everyone's; the optimizer's state (warm starts of its own samples) and random state its own,
    or replica 0's when the checkpoint has none for it."""
    own = {key: value for key, value in state.items() if key != "replicas"}
    others = state.get("replicas") or []
    if 0 < replica <= len(others):
        own.update(others[replica - 1])
    return own


def _merged_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's checkpoint state: replica 0's, with the other replicas' own parts under
    `replicas` (their parameters are replica 0's)."""
    first = states[0]
    if len(states) == 1:
        return first
    return {**first, "replicas": [{key: s[key] for key in ("optimizer", "generator") if key in s}
                                  for s in states[1:]]}


def merge_reports(reports: list[Any]) -> Any:
    """One report for a stage from its replicas': the report's own `merged` says how (by
    default replica 0's: exact replicas compute the same)."""
    first = reports[0]
    if first is None or len(reports) == 1 or not hasattr(first, "merged"):
        return first
    return first.merged(reports)


def merge_results(results: list[PlanResult], command: str | None) -> PlanResult:
    """The stage's result from its replicas' (in replica order): sums over their shares, the
    report merged, every replica's timeline events, the largest memory reading."""
    first = results[0]
    if len(results) == 1:
        return first
    losses: dict[int, float] = defaultdict(float)
    correct: dict[int, float] = defaultdict(float)
    sums: dict[tuple[ActionKind, int], list[float]] = {}
    events = []
    for r, result in enumerate(results):
        for j, value in result.losses.items():
            losses[j] += value
        for j, value in result.correct.items():
            correct[j] += value
        for key, triple in result.sums.items():
            total = sums.setdefault(key, [0.0, 0.0, 0])
            for i in range(3):
                total[i] += triple[i]
        events += [dataclasses.replace(e, replica=r) for e in result.events]
    changes: dict[str, Any] = {
        "losses": dict(losses), "correct": dict(correct), "events": events,
        "sums": {key: (t[0], t[1], int(t[2])) for key, t in sums.items()},
        "report": merge_reports([r.report for r in results])}
    readings = [m for m in (getattr(r, "memory", None) for r in results) if m is not None]
    if readings:
        changes["memory"] = max(readings, key=lambda m: m.peak)
    if command == "checkpoint_state":
        changes["value"] = _merged_state([r.value for r in results])
    return dataclasses.replace(first, **changes)
