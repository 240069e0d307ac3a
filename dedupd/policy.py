"""What to do with an image: pure decisions from a policy, a candidate and its matches.

Nothing here touches files or the store; the daemon carries decisions out. Keeping the
rules pure makes them easy to test and to reason about when a threshold is wrong.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from dedupd.config import CircuitBreaker, Policy
from dedupd.store import ImageRecord, Match

ACCEPT, DUPLICATE, REPLACE = "accept", "duplicate", "replace"


def big_enough(policy: Policy, width: int, height: int) -> bool:
    return width >= policy.min_width and height >= policy.min_height


@dataclass(frozen=True)
class Decision:
    """verdict: accept (keep the newcomer), duplicate (act on the newcomer), or
    replace (keep the newcomer, act on the older copy in `match`)."""

    verdict: str
    action: str  # the policy's action, or "log" when the circuit breaker is open
    match: Match | None = None


def decide(policy: Policy, candidate: ImageRecord, matches: list[Match],
           *, breaker_open: bool = False, newcomer_first: bool = False) -> Decision:
    """Apply keep=first|largest to the nearest live match. `newcomer_first`: the
    candidate arrived before that match (which was only decided sooner), so under
    keep=first the match is the duplicate."""
    action = "log" if breaker_open else policy.action
    if not matches:
        return Decision(ACCEPT, action)
    best = matches[0]
    if policy.keep == "first" and newcomer_first:
        return Decision(REPLACE, action, best)
    if policy.keep == "largest" and not best.identical:
        old = best.record
        if candidate.width * candidate.height > old.width * old.height:
            return Decision(REPLACE, action, best)
    return Decision(DUPLICATE, action, best)


class Breaker:
    """Per-root circuit breaker: trips when too many recent decisions would remove files.

    Once open it stays open until the config is reloaded or the daemon restarts: an
    operator must look at the threshold before files move again.
    """

    def __init__(self, settings: CircuitBreaker) -> None:
        self.settings = settings
        self._recent: deque[bool] = deque(maxlen=settings.window)
        self._lock = threading.Lock()
        self.open = False

    def record(self, removes: bool) -> bool:
        """Note one decision; returns True exactly when this decision trips the breaker."""
        with self._lock:
            self._recent.append(removes)
            if self.open or len(self._recent) < self.settings.min_decisions:
                return False
            share = sum(self._recent) / len(self._recent)
            if share > self.settings.threshold:
                self.open = True
                return True
            return False

    @property
    def decisions(self) -> int:
        """How many recent decisions the share is of (at most the window)."""
        with self._lock:
            return len(self._recent)

    @property
    def share(self) -> float:
        with self._lock:
            return sum(self._recent) / len(self._recent) if self._recent else 0.0
