"""The main loop's small scheduled tasks (root checks, store pings, STATUS, summaries,
checkpoints, heap trims, the periodic reconcile) with one timer each, in one place."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Task:
    """Run `run` once `interval()` seconds have passed since its last run, or whenever
    `early()` says so; an interval of 0 is off."""

    name: str
    interval: Callable[[], float]
    run: Callable[[], object]
    last: float
    early: Callable[[], bool] | None = None


class Periodic:
    """A tiny scheduler for the main thread: `every()` registers, `run_due()` runs what is
    due, in registration order. A task's timer restarts when it finishes, so a slow one
    (a store ping during an outage) is not run back to back."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tasks: list[Task] = []

    def every(self, interval: float | Callable[[], float], run: Callable[[], object], *,
              name: str = "", early: Callable[[], bool] | None = None) -> None:
        seconds = interval if callable(interval) else (lambda: interval)
        self.tasks.append(Task(name or getattr(run, "__name__", "task"), seconds, run,
                               self.clock(), early))

    def run_due(self) -> list[str]:
        """Run the tasks that are due; their names, in order."""
        ran = []
        now = self.clock()
        for task in self.tasks:
            interval = task.interval()
            if (interval and now - task.last >= interval) or (task.early and task.early()):
                task.run()
                task.last = now = self.clock()
                ran.append(task.name)
        return ran


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent from musl and others
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim).

    Each image passes through buffers of a different size (its bytes, libjpeg's
    scratch), which glibc serves from its heaps once its mmap threshold has adapted;
    the freed holes between live blocks stay resident, and a 20,000-image soak crept
    up 3-7 MiB beyond the store's own growth. Making every large buffer a fresh mmap
    instead costs 0.2 ms per image in page faults; trimming when idle costs nothing.
    False where the C library has no malloc_trim."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
