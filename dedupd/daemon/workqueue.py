"""The daemon's queue of paths waiting to be hashed (see WorkQueue).

WorkQueue is over 200 lines on purpose: its two classes, timers and arrival-ordered ready
heaps, holds and backpressure share one condition variable, and splitting it would split
that lock.
"""

from __future__ import annotations

import heapq
import threading
import time
from pathlib import Path


class WorkQueue:
    """Paths waiting to be hashed: deduplicated, each due at a time (settle delay), in
    two classes. Live events (a file just written or renamed in) are always served
    before background work (what a periodic or start-up reconcile found), so a
    reconcile that queues a million changed files never delays a file arriving now.

    Bounded per class: `put(block=False)` refuses past `limit` waiting (the caller
    rescans that directory later), `put(block=True)` (a scanner) waits for room, which
    is the backpressure. Each class has its own bound: background work never takes a
    live event's place.
    """

    def __init__(self, limit: int, background_slots: int | None = None) -> None:
        self.limit = limit
        # Workers that may hold background work at once: the daemon keeps one of its
        # workers for live events, so a file arriving never waits for a big picture a
        # reconcile queued to finish decoding.
        self.background_slots = background_slots
        self._due: dict[Path, tuple[float, bool]] = {}  # path -> (due, background)
        self._waiting = [0, 0]  # per class: live, background
        self._arrived: dict[Path, float] = {}  # first put of a path not yet done (metrics)
        # Per path while queued or in flight: (arrival, since). arrival: wall-clock time
        # of its first event, or its mtime if a scan found it; since: time.monotonic()
        # from which it waited (a scan's start). keep: first decides by arrival.
        self._arrival: dict[Path, tuple[float, float]] = {}
        self.arrivals = 0  # paths that entered the queue (metrics)
        self._taken: dict[Path, bool] = {}  # handed to a worker, not yet done(): class
        # Due again while a worker still has it: handed out after done(), never to a second
        # worker at once (two would both decide it, and log it twice).
        self._held: dict[Path, tuple[float, bool]] = {}
        # Per class: paths by due time (settling), then, once due, by arrival: of the
        # files ready to be hashed the earliest arrival goes first (keep: first), not
        # the one whose event came first (a retry, a directory's listing order).
        self._heaps: tuple[list[tuple[float, int, Path]], ...] = ([], [])
        self._ready: tuple[list[tuple[float, int, Path, float]], ...] = ([], [])
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def put(self, path: Path, delay: float = 0.0, *, block: bool = False,
            background: bool = False, arrival: float | None = None,
            since: float | None = None, postpone: bool = True) -> bool:
        """Queue path (a live event unless `background`); False if refused (full or
        closed). A live event for a path waiting as background work promotes it; a
        background put for a path already waiting changes nothing. A delay postpones a
        path already waiting (it was modified again) unless `postpone` is False."""
        with self._cond:
            while True:
                old = self._due.get(path)
                if self._closed:
                    return False
                if old is not None and background:
                    return True
                if old is not None or self._waiting[background] < self.limit:
                    break
                if not block:
                    return False
                self._cond.wait(0.5)
            now = time.monotonic()
            if old is None:
                self._waiting[background] += 1
                due = now + delay if delay > 0 else now
            else:
                if old[1]:  # promoted from background work to a live event
                    self._waiting[1] -= 1
                    self._waiting[0] += 1
                # A close/rename makes a file due now; a modification postpones it.
                due = now + delay if delay > 0 and postpone else min(old[0], now + delay)
            self._due[path] = (due, background)
            if path not in self._arrived:
                self._arrived[path] = now
                self.arrivals += 1
                self._arrival[path] = (time.time() if arrival is None else arrival,
                                       now if since is None else since)
            elif arrival is not None and arrival < self._arrival[path][0]:
                # A scan found it with an older mtime than its first event's time: the
                # files of a directory moved in whole come with synthetic creation events
                # in listing order, and keep: first must go by when they were written.
                self._arrival[path] = (arrival, self._arrival[path][1])
            self._seq += 1
            heapq.heappush(self._heaps[background], (due, self._seq, path))
            self._cond.notify_all()
            return True

    def __contains__(self, path: object) -> bool:
        """Waiting or being processed."""
        with self._cond:
            return path in self._due or path in self._taken

    def pending(self, background: bool) -> int:
        """Paths of one class waiting or being processed."""
        with self._cond:
            return self._waiting[background] + sum(1 for b in self._taken.values()
                                                   if b == background)

    def live_due(self) -> bool:
        """A live path is due (ready to be hashed) or in a worker; files still settling
        do not count (a slow writer may take minutes)."""
        with self._cond:
            self._tidy()
            return bool(self._ready[0]) or False in self._taken.values()

    def wait_drained(self, background: bool, stop: threading.Event) -> None:
        """Until nothing of the class waits or is in flight (or stop, or close)."""
        with self._cond:
            while not self._closed and not stop.is_set() and (
                    self._waiting[background] or background in self._taken.values()):
                self._cond.wait(0.5)

    def arrival(self, path: Path) -> tuple[float | None, float | None]:
        """(arrival, since) of a queued or in-flight path; (None, None) if unknown."""
        with self._cond:
            return self._arrival.get(path, (None, None))

    def wait_turn(self, path: Path, timeout: float) -> None:
        """Wait (at most timeout) until no file that arrived before `path` is still in
        a worker's hands: decisions follow arrival order even when a later copy hashes
        sooner (keep: first). Arrival order is total, so waits never form a cycle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            mine = (self._arrival.get(path, (time.time(), 0.0))[0], str(path))
            while not self._closed:
                earlier = any(p != path and (self._arrival.get(p, (mine[0], 0.0))[0], str(p))
                              < mine for p in self._taken)
                left = deadline - time.monotonic()
                if not earlier or left <= 0:
                    return
                self._cond.wait(left)

    def done(self, path: Path) -> None:
        with self._cond:
            self._taken.pop(path, None)
            if path not in self._due:
                self._arrived.pop(path, None)
                self._arrival.pop(path, None)
            held = self._held.pop(path, None)
            if held is not None and self._due.get(path) == held:
                self._seq += 1
                heapq.heappush(self._heaps[held[1]], (held[0], self._seq, path))
            self._cond.notify_all()

    def discard(self, path: Path) -> None:
        with self._cond:
            old = self._due.pop(path, None)
            if old is not None:
                self._waiting[old[1]] -= 1
                self._cond.notify_all()
            if path not in self._taken:
                self._arrived.pop(path, None)
                self._arrival.pop(path, None)

    def arrived(self, path: Path) -> float | None:
        """When (monotonic) path was first queued, for the decision latency."""
        with self._cond:
            return self._arrived.get(path)

    def _tidy(self) -> None:
        """Move what is due from the timers to the ready heaps; drop superseded entries;
        hold those a worker has until its done()."""
        now = time.monotonic()
        for background, (timers, ready) in enumerate(zip(self._heaps, self._ready,
                                                         strict=True)):
            while timers and timers[0][0] <= now:
                due, _, path = heapq.heappop(timers)
                if self._due.get(path) == (due, background):
                    self._seq += 1
                    heapq.heappush(ready, (self._arrival[path][0], self._seq, path, due))
            while ready and (self._due.get(ready[0][2]) != (ready[0][3], background)
                             or ready[0][2] in self._taken):
                _, _, held, due = heapq.heappop(ready)
                if self._due.get(held) == (due, background):
                    self._held[held] = (due, bool(background))

    def yield_to_live(self, timeout: float) -> None:
        """For a background producer (the scanner): wait while live paths are due or in
        a worker, at most `timeout`. Its Python loop would otherwise take the GIL from
        theirs in 5 ms slices, several times per file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                self._tidy()
                now = time.monotonic()
                if now >= deadline or not (False in self._taken.values() or self._ready[0]):
                    return
                self._cond.wait(deadline - now)

    def get(self, timeout: float = 0.5) -> Path | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                self._tidy()
                slots = self.background_slots
                for background, ready in enumerate(self._ready):
                    if background and slots is not None and (
                            sum(self._taken.values()) >= slots
                            or False in self._taken.values()):
                        # The workers left are kept for live events, and a live file
                        # being decided has the process (and its GIL) to itself.
                        continue
                    if ready:
                        path = heapq.heappop(ready)[2]
                        del self._due[path]
                        self._waiting[background] -= 1
                        self._taken[path] = bool(background)
                        self._cond.notify_all()  # room for blocked producers
                        return path
                if now >= deadline:
                    return None
                wait = min([deadline - now] + [h[0][0] - now for h in self._heaps if h])
                self._cond.wait(max(wait, 0.001))
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

