"""How an online run is going, from its held-out rewards (pure logic: no Ray, no torch).

Each round's row holds the held-out reward measured at the round's *start*, of the weights the
generators then hold (those synced at the end of the round before; round 1's: the initial model);
the run's final row holds that of the last weights. :func:`reward_fall` says when the latest of these
numbers gave back more than half of what the run had gained, and :class:`BestWeights` remembers
which weights earned the highest one (``online.keep: best``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

#: The handle :class:`BestWeights` keeps for the initial model (its weights are the model's files).
INITIAL = "initial"


@dataclass(frozen=True)
class Fall:
    """The latest held-out reward is below ``best - 0.5 * (best - first)``."""

    first: float
    """The first held-out reward measured (round 1's, of the initial model)."""
    best: float
    best_at: int
    """Index of the best one in the rewards given (0: the first round's)."""
    current: float


def reward_fall(rewards: Sequence[Optional[float]]) -> Optional[Fall]:
    """A :class:`Fall` when the last of ``rewards`` (the held-out rewards in the order they were
    measured; None where a measure is missing) fell by more than half of the gain so far (the best
    before it minus the first one), given there was a gain; else None."""
    measured = [(i, r) for i, r in enumerate(rewards) if r is not None]
    if len(measured) < 3 or rewards[-1] is None:  # a first, a better one and the current at least
        return None
    (_, first), (_, current) = measured[0], measured[-1]
    best_at, best = max(measured[:-1], key=lambda ir: (ir[1], -ir[0]))  # the earliest of equal bests
    gain = best - first
    if gain > 0 and current < best - 0.5 * gain:
        return Fall(first, best, best_at, current)
    return None


@dataclass(frozen=True)
class Kept:
    """The weights after ``round`` rounds (0: the initial model), their held-out reward and handle."""

    round: int
    reward: float
    handle: Any = None


class BestWeights:
    """The weights with the highest held-out reward among those offered.

    ``hold``: keep the best one's handle (an object ref of its state dict; :data:`INITIAL` for the
    initial model); without it only the round and the reward are kept, so no ref outlives its
    round. Of equal rewards the later weights win (more trained, and the last are already the
    exported model)."""

    def __init__(self, hold: bool):
        self.hold = hold
        self.best: Optional[Kept] = None

    def offer(self, round_: int, reward: Optional[float], handle: Any = None) -> bool:
        """The weights after ``round_`` rounds earned ``reward`` (None: not measured, not a candidate);
        returns whether they are now the best (the handle of the one they replace is dropped)."""
        if reward is None or (self.best is not None and reward < self.best.reward):
            return False
        self.best = Kept(round_, reward, handle if self.hold else None)
        return True


def when(index: int, rounds: int) -> str:
    """When held-out reward ``index`` of a run of ``rounds`` rounds was measured (its rows' in
    order, then the final one's)."""
    return f"at the start of round {index + 1}" if index < rounds else "after the last round"


def describe_fall(fall: Fall, rounds: int, keep: str) -> str:
    """The console warning for ``fall`` in a run of ``rounds`` rounds with ``online.keep`` ``keep``."""
    advice = "" if keep == "best" else "; online.keep: best exports the best weights instead of the last"
    return (f"online: warning: the held-out reward fell to {fall.current:.2f}, more than half of its gain back "
            f"(first {fall.first:.2f}, best {fall.best:.2f} {when(fall.best_at, rounds)}): the policy may be collapsing; "
            f"a lower train.learning_rate, fewer online.steps_per_round or the chosen completions' NLL in the loss "
            f"(loss.type: [sigmoid, sft], RPO) may help{advice}")


def describe_kept(kept: Optional[Kept], rounds: int, last: Optional[float]) -> str:
    """The console line saying which weights ``output.dir/model`` holds (``online.keep: best``);
    ``last``: the last weights' held-out reward."""
    if kept is None:
        return "online: no held-out reward was measured: the model is the last round's weights"
    which = "the initial model's weights" if kept.round == 0 else f"the weights after round {kept.round}"
    if kept.round == rounds:
        return f"online: kept the last round's weights, the best (held-out reward {kept.reward:.3f})"
    tail = "" if last is None else f"; the last round's: {last:.3f}"
    return f"online: kept {which}, the best (held-out reward {kept.reward:.3f}{tail})"
