"""Is the daemon well, and what is it doing: store outages (workers pause, files wait in
the queue), the systemd watchdog's answer, the STATUS line and the metrics' gauges."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from dedupd.events import Event, emit
from dedupd.store import StoreError
from dedupd.store.base import UNRESOLVED

if TYPE_CHECKING:
    from dedupd.daemon.core import Daemon
    from dedupd.metrics import DaemonState

log = logging.getLogger("dedupd.daemon")


class Health:
    """Outage state, busy workers and the main loop's last tick, read by the watchdog,
    STATUS= and the metrics."""

    def __init__(self, daemon: Daemon) -> None:
        from dedupd.metrics import Refreshed  # prometheus_client: a daemon's only

        self.daemon = daemon
        # While the store is unreachable: why and since when (workers pause, files wait).
        self.store_down: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self.busy: dict[int, float] = {}  # worker thread id -> time its current file started
        self.tick = time.monotonic()  # the main loop's last turn
        # A count over the store: at most once a minute, whatever the scrape interval.
        self._pending_count = Refreshed(
            lambda: daemon.store.with_status(UNRESOLVED, 0)[1], 60)

    # ------------------------------------------------------------ store outages

    def store_failed(self, exc: StoreError, **fields: object) -> None:
        """The store failed a call: say so once per outage; workers then pause (files
        wait in the queue) until check_store() sees it answer again."""
        with self._lock:
            first = self.store_down is None
            since = time.time() if self.store_down is None else self.store_down[1]
            self.store_down = (str(exc), since)  # the latest reason, the outage's start
        if first:
            emit(Event.STORE_UNAVAILABLE, f"store unavailable; files wait in the queue and "
                 f"are retried: {exc}", reason=str(exc), **fields)  # type: ignore[arg-type]
            self.daemon.notifier.status(self.status_line())
        else:
            log.debug("store still unavailable: %s", exc)

    def check_store(self) -> bool:
        """Ping the store (main loop): notice outages while idle, and recoveries."""
        d = self.daemon
        try:
            d.store.ping()
            for entry in d.quarantine.finish_moves():
                d.pipeline.actor.report_quarantined(entry)
        except StoreError as exc:
            self.store_failed(exc)
            return False
        with self._lock:
            down, self.store_down = self.store_down, None
        if down is not None:
            emit(Event.STORE_RECOVERED, f"store available again after "
                 f"{time.time() - down[1]:.0f} s; resuming the queue ({len(d.queue)} "
                 "files waiting)", reason=down[0])
            d.notifier.status(self.status_line())
        return True

    # ------------------------------------------------------------ health and status

    def healthy(self) -> bool:
        """Progress, for the systemd watchdog: main loop alive, no worker wedged."""
        now = time.monotonic()
        if now - self.tick > 10 or not self.daemon.watcher.alive():
            return False
        return all(now - started < self.daemon.config.stall_seconds
                   for started in list(self.busy.values()))

    def status_line(self) -> str:
        d = self.daemon
        c = d.pipeline.counts
        down = self.store_down
        outage = (f"store unavailable since {time.strftime('%H:%M:%S', time.localtime(down[1]))}"
                  f", retrying: {down[0]}; " if down else "")
        sizes = [d.store.live_count(scope, d.config.recipe.key)
                 for scope in {w.scope for w in d.config.watches}]
        indexed = f"{sum(sizes)} indexed, " if sizes and None not in sizes else ""
        return (f"{outage}{len(d.config.watches)} roots{d.scanner.status()}; {indexed}"
                f"{c['processed']} processed, {c['accepted']} accepted, "
                f"{c['quarantined']} quarantined, {c['rejected']} rejected; "
                f"queue {len(d.queue)}")

    def metrics_state(self) -> DaemonState:
        """The gauges of the metrics, read when they are scraped."""
        from dedupd.metrics import DaemonState

        d = self.daemon
        scopes = {w.scope for w in d.config.watches}
        indexed = {s: d.store.live_count(s, d.config.recipe.key) for s in scopes}
        return DaemonState(
            queue_depth=len(d.queue), queued_total=d.queue.arrivals,
            store_available=self.store_down is None,
            indexed={s: n for s, n in indexed.items() if n is not None},
            breakers_open={str(root): b.open for root, b in d.pipeline.breakers.items()},
            last_reconcile=d.scanner.last_reconcile,
            pending_quarantines=self._pending_count())

    def count_fields(self) -> dict[str, object]:
        return {f"count_{k}": v for k, v in self.daemon.pipeline.counts.items()}
