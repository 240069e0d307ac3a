"""Rescans: requests to reconcile a directory (start-up, reload, overflow, a directory
that moved in, a full queue, the periodic safety net) and the two scanner threads that
serve them, live ones before a whole root's reconcile. The walk itself is
dedupd.daemon.reconcile's."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.daemon.reconcile import LIVE_TRIGGERS, Reconciler
from dedupd.store import StoreError

if TYPE_CHECKING:
    from dedupd.daemon.core import Daemon

log = logging.getLogger("dedupd.daemon")


class Scanner:
    """Requested scans, merged and served shallowest first by two threads."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.reconciler = Reconciler(daemon)
        # Scans waiting, path -> (trigger, recursive): for the background scanner (whole
        # roots) and for the live one (directories named by live events).
        self.requests: dict[bool, dict[Path, tuple[str, bool]]] = {False: {}, True: {}}
        self._cond = threading.Condition()
        self._scanning = 0
        self._scanning_live = 0

    @property
    def last_reconcile(self) -> float | None:
        """Unix time of the last finished reconcile of a whole root."""
        return self.reconciler.last_reconcile

    def request(self, *paths: Path, trigger: str, recursive: bool = True) -> None:
        """Reconcile these directories soon. Live triggers (a directory event, a full
        queue) go to the live scanner, whose files are live events; the others to the
        background scanner."""
        live = trigger in LIVE_TRIGGERS
        with self._cond:
            requests = self.requests[live]
            for path in paths:
                old = requests.get(path)
                if old is not None:  # keep the more thorough of the two
                    trigger = old[0] if trigger == "interval" else trigger
                    recursive = recursive or old[1]
                requests[path] = (trigger, recursive)
            self._cond.notify_all()

    def pending(self) -> bool:
        """A scan is running or requested."""
        with self._cond:
            return bool(self._scanning or any(self.requests.values()))

    def live_pending(self) -> bool:
        """A scan for a live event (a directory that appeared) is running or requested."""
        with self._cond:
            return bool(self._scanning_live or self.requests[True])

    def wake(self) -> None:
        """Let the scanner threads see the daemon stopping."""
        with self._cond:
            self._cond.notify_all()

    def _next(self, live: bool) -> tuple[Path, str, bool] | None:
        """The shallowest requested directory; requests it covers are merged into it (a
        periodic run that covers a request for a full comparison becomes one)."""
        stopping = self.daemon.stopping
        with self._cond:
            requests = self.requests[live]
            while not requests and not stopping.is_set():
                self._cond.wait(1.0)
            if stopping.is_set():
                return None
            path = min(requests, key=lambda p: len(p.parts))
            trigger, recursive = requests.pop(path)
            if recursive:
                for other in [p for p in requests if path in p.parents]:
                    covered = requests.pop(other)[0]
                    trigger = covered if trigger == "interval" else trigger
            self._scanning += 1
            self._scanning_live += live
            return path, trigger, recursive

    def loop(self, live: bool) -> None:
        """A scanner thread: serve requests of one class until the daemon stops."""
        health, stopping = self.daemon.health, self.daemon.stopping
        while (request := self._next(live)) is not None:
            path, trigger, recursive = request
            try:
                self.reconciler.run(path, trigger, recursive=recursive)
            except StoreError as exc:
                health.store_failed(exc, root=str(path))
                while health.store_down and not stopping.is_set():
                    stopping.wait(0.5)
                self.request(path, trigger=trigger, recursive=recursive)
            except Exception:
                log.exception("reconciliation of %s failed", path)
            finally:
                with self._cond:
                    self._scanning -= 1
                    self._scanning_live -= live

    def status(self) -> str:
        """' (scanning); reconciling /data: 412,000 files seen, 41% of the last count', or
        ' (scanning)' alone between a request and its start (READY's status)."""
        parts = []
        for root, counts in list(self.reconciler.progress.items()):
            last = self.reconciler.last_seen.get(root)
            share = f", {min(99, 100 * counts['seen'] // last)}% of the last count" \
                if last else ""
            parts.append(f"{root}: {counts['seen']:,} files seen{share}")
        if parts:
            return f" (scanning); reconciling {'; '.join(parts)}"
        return " (scanning)" if self.pending() else ""
