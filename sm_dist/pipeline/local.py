"""LocalPipeline: every stage in this process, the schedule run one action at a time (the
engine's reference: the same plans through the same handlers, without threads or RPC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sm_dist.pipeline.actions import ScheduleError
from sm_dist.pipeline.executor import MailKey, Plan, PlanResult, StageExecutor
from sm_dist.pipeline.interface import Done, Pending, Pipeline
from sm_dist.pipeline.schedule import Pass, Position, list_schedule
from sm_dist.pipeline.stage import Stage


class LocalChannel:
    """Stage-to-stage tensors as entries of per-stage mailboxes in this process."""

    def __init__(self, mailboxes: list[dict[MailKey, Any]], index: int) -> None:
        self.mailboxes = mailboxes
        self.index = index
        # per stage, what is told of each delivery to it (StageExecutor.arrived)
        self.arrivals: list[Callable[[MailKey, Any], None]] = []

    @property
    def mailbox(self) -> dict[MailKey, Any]:
        """What the neighbours have sent this stage and it has not taken yet."""
        return self.mailboxes[self.index]

    def receive(self, key: MailKey, source: int, what: str) -> Any:
        try:
            return self.mailboxes[self.index].pop(key)
        except KeyError:  # LocalPipeline runs an action only once its input is there
            raise ScheduleError(f"stage {self.index} needs {what} before it was sent") from None

    def send(self, stage: int, key: MailKey, payload: Any) -> None:
        self.mailboxes[stage][key] = payload
        if self.arrivals:
            self.arrivals[stage](key, payload)

    def flush(self) -> None:
        pass

    def arrived(self, key: MailKey | None, plan_id: int) -> bool:
        return True  # in one process nothing waits for its input: there is no bubble to fill

    def arrival(self, plan_id: int) -> float | None:
        return None

    def fill_step(self, step: Callable[[], int]) -> int:
        return step()


class LocalPipeline(Pipeline):
    """Runs the stages of one pipeline in one process: the list scheduler performs each action
    as it schedules it (stage by stage, each as far as its inputs allow). Every stage performs
    exactly its plan's order, through the engine's handlers, so both give the same numbers;
    the order across stages is fixed too (it does not depend on timing). With no bubbles in
    one process, fill steps take none."""

    shares_process = True

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__(len(stages))
        self.stages = stages
        mailboxes: list[dict[MailKey, Any]] = [{} for _ in stages]
        self.channels = [LocalChannel(mailboxes, s) for s in range(len(stages))]
        self.executors = [StageExecutor(stage, channel)
                          for stage, channel in zip(stages, self.channels)]
        arrivals = [executor.arrived for executor in self.executors]
        for channel in self.channels:  # one list, as the mailboxes are one list
            channel.arrivals = arrivals

    def _dispatch(self, plans: list[Plan]) -> Pending[list[PlanResult]]:
        runs = [executor.start(plan) for executor, plan in zip(self.executors, plans,
                                                                 strict=True)]

        def ready(at: Position) -> bool:  # what the stage waits for has really been sent
            key = runs[at[0]].input_key(at[2])
            return key is None or key in self.channels[at[0]].mailbox

        def perform(at: Position) -> None:
            runs[at[0]].perform(at[2])

        list_schedule([Pass(plans[0].iteration, [plan.actions for plan in plans])],
                      ready=ready, perform=perform)
        results = [run.finish() for run in runs]
        if self.action_sink is not None:
            self.action_sink([event for result in results for event in result.events])
        return Done(results)
