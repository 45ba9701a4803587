"""When fill mode stops: a fill step is started only if it should end, with what follows the fill,
before the stage's next input arrives (the bubble the last fill measured)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FillBudget:
    """A stage's fill-mode clock: the last bubble, the longest fill step, what follows the fill.

    The bubble is measured from the start of a fill to the arrival of the input that ended it
    (the channel stamps each delivery), so a fill that overshot does not stretch the next
    budget. Before the first bubble is known, a fill runs until its input arrives.
    """

    bubble: float | None = None  # seconds from the start of the last fill to its next input
    step: float = 0.0  # the longest fill step seen
    after: float = 0.0  # the stage's work between the fill and its next input (the apply)
    began: float | None = None  # when the current fill began (time.time())

    def begin(self, now: float, last_bubble: float | None) -> None:
        """A fill starts at `now`; `last_bubble`: what the previous one measured, if known."""
        if last_bubble is not None:
            self.bubble = last_bubble
        self.began = now

    def allows(self, now: float) -> bool:
        """Whether a step started at `now` should end, with what follows, within the bubble."""
        if self.bubble is None or self.began is None:
            return True
        return (now - self.began) + self.step + self.after <= self.bubble

    def took(self, seconds: float) -> None:
        self.step = max(self.step, seconds)
