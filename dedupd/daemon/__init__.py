"""The long-running service (dedupd.daemon.core.Daemon) and its parts: intake (watcher
events into the queue, workers along the pipeline), scanner and reconcile (rescans),
workqueue, health (outages, STATUS, watchdog, metrics), periodic (scheduled tasks)."""

from __future__ import annotations

from dedupd.daemon.core import Daemon
from dedupd.daemon.periodic import release_free_heap
from dedupd.daemon.workqueue import WorkQueue

__all__ = ["Daemon", "WorkQueue", "release_free_heap"]
