"""LocalPipeline: every stage in this process, the schedule run one action at a time (the
engine's oracle: the same plans through the same handlers, without threads or RPC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sm_dist.pipeline.actions import ScheduleError
from sm_dist.pipeline.executor import MailKey, Plan, PlanResult, StageExecutor
from sm_dist.pipeline.interface import Done, Pending, Pipeline
from sm_dist.pipeline.stage import Stage


class LocalChannel:
    """Stage-to-stage tensors as entries of per-stage mailboxes in this process."""

    def __init__(self, mailboxes: list[dict[MailKey, Any]], index: int) -> None:
        self.mailboxes = mailboxes
        self.index = index

    def receive(self, key: MailKey, source: int, what: str) -> Any:
        try:
            return self.mailboxes[self.index].pop(key)
        except KeyError:  # LocalPipeline runs an action only once its input is there
            raise ScheduleError(f"stage {self.index} needs {what} before it was sent") from None

    def has(self, key: MailKey) -> bool:
        return key in self.mailboxes[self.index]

    def send(self, stage: int, key: MailKey, payload: Any) -> None:
        self.mailboxes[stage][key] = payload

    def flush(self) -> None:
        pass

    def arrived(self, key: MailKey | None, plan_id: int) -> bool:
        return True  # in one process nothing waits for its input: there is no bubble to fill

    def fill_step(self, step: Callable[[], int]) -> int:
        return step()


class LocalPipeline(Pipeline):
    """Runs the stages of one pipeline in one process: stage by stage, each as far as its
    inputs allow, until every action of the pass is done. Every stage performs exactly its
    plan's order, through the engine's handlers, so both give the same numbers; the order
    across stages is fixed too (it does not depend on timing). With no bubbles in one
    process, fill steps take none."""

    shares_process = True

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(len(stages))
        self.stages = stages
        mailboxes: list[dict[MailKey, Any]] = [{} for _ in stages]
        self.channels = [LocalChannel(mailboxes, s) for s in range(len(stages))]
        self.executors = [StageExecutor(stage, channel)
                          for stage, channel in zip(stages, self.channels)]

    def _dispatch(self, plans: list[Plan]) -> Pending[list[PlanResult]]:
        runs = [executor.start(plan) for executor, plan in zip(self.executors, plans,
                                                                 strict=True)]
        done = [0] * len(plans)
        while any(done[s] < len(plan.actions) for s, plan in enumerate(plans)):
            progressed = False
            for s, plan in enumerate(plans):
                while done[s] < len(plan.actions):
                    key = runs[s].input_key(done[s])
                    if key is not None and not self.channels[s].has(key):
                        break  # a neighbour has not sent it yet
                    runs[s].perform(done[s])
                    done[s] += 1
                    progressed = True
            if not progressed:
                stuck = ", ".join(f"stage {s} at {plan.actions[done[s]]}"
                                  for s, plan in enumerate(plans) if done[s] < len(plan.actions))
                raise ScheduleError(f"the schedule deadlocks: {stuck} wait for each other")
        results = [run.finish() for run in runs]
        if self.action_sink is not None:
            self.action_sink([event for result in results for event in result.events])
        return Done(results)
