"""plans.jsonl: every pass a pipeline dispatched, one JSON line each, which the simulator
replays (`sm-dist simulate`) instead of guessing the passes from the records."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sm_dist.pipeline.actions import Action, kind_in_trace
from sm_dist.pipeline.schedule import Pass
from sm_dist.whole_files import RecordFile

PLAN_LOG = "plans.jsonl"  # in the run directory
_ACTION = re.compile(r"([A-Za-z])(\d*)(?:\.(\d+))?")


def action_text(action: Action) -> str:
    """'F3', 'I10', 'L', or 'J2.5' (index 2 of the repetition 5 of its kind in the plan)."""
    return str(action) + (f".{action.step}" if action.step else "")


def parse_action(text: str) -> Action:
    """The action `action_text` wrote (a kind no loaded optimizer registers is kept as one of
    its own, as in traces)."""
    match = _ACTION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an action (expected e.g. F0, I10, L, J2.5)")
    letter, index, step = match.groups()
    return Action(kind_in_trace(letter), int(index) if index else None, int(step or 0))


def pass_line(plan_id: int, dispatched: Pass) -> str:
    return json.dumps({"plan": plan_id, "iteration": dispatched.iteration,
                       "waits": dispatched.waits,
                       "stages": [[action_text(a) for a in actions]
                                  for actions in dispatched.schedule]}) + "\n"


def read_plan_log(path: Path) -> list[tuple[int, Pass]]:
    """(plan id, pass) of every line; a last line cut short by a crash is skipped."""
    passes = []
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: cut short
                continue
            raise ValueError(f"{path} line {number} is not JSON") from None
        schedule = [[parse_action(text) for text in actions] for actions in item["stages"]]
        passes.append((int(item["plan"]), Pass(int(item["iteration"]), schedule,
                                               bool(item["waits"]))))
    return passes


class PlanLogWriter:
    """Appends one whole line per dispatched pass, as it is sent: a failed write (a full disk)
    is cut back to the last whole line (whole_files.RecordFile)."""

    def __init__(self, path: Path, mode: str = "a") -> None:
        self._file = RecordFile(path, mode)

    def write(self, plan_id: int, dispatched: Pass) -> None:
        self._file.append(pass_line(plan_id, dispatched))

    def close(self) -> None:
        self._file.close()
