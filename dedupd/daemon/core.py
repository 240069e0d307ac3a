"""The long-running service: watch, settle, hash, decide, act — and never lose a file.

Threads: the watchdog observer feeds a deduplicating, time-ordered work queue through
the intake; a pool of hashing threads (OpenCV decodes outside the GIL) takes paths from
it along the pipeline; two scanner threads reconcile directories against the store (at
start, periodically, after an inotify overflow, for directories that moved in); the main
thread handles signals, reloads and the periodic tasks. Daemon composes these parts:
intake, scanner (and its reconciler), roots, health, periodic; it owns the lifecycle:
start, run, stop, reload.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.access import check_writable
from dedupd.config import Config, ConfigError, load_config
from dedupd.daemon.health import Health
from dedupd.daemon.intake import Intake
from dedupd.daemon.periodic import Periodic, release_free_heap
from dedupd.daemon.roots import Roots
from dedupd.daemon.scanner import Scanner
from dedupd.daemon.workqueue import WorkQueue
from dedupd.events import Event, emit, emit_summary
from dedupd.pipeline import Pipeline
from dedupd.service import Notifier, WatchdogPinger, write_reload_ack
from dedupd.store import Store, StoreError, open_store
from dedupd.watcher import Watcher, WatchError

if TYPE_CHECKING:
    from dedupd.metrics import DaemonState

log = logging.getLogger("dedupd.daemon")

# How often the store persists its in-memory index: after a SIGKILL, a start catches up
# on at most this much work.
CHECKPOINT_SECONDS = 900.0
# Trim at least this often while files keep coming (otherwise whenever the queue empties).
TRIM_SECONDS = 30.0


class Daemon:
    """One dedupd service instance. `start()`, then `run()` until a signal, or `stop()`."""

    def __init__(self, config: Config, *, config_path: str | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.store: Store = open_store(config.index)
        self.pipeline = Pipeline(config, self.store)
        self.quarantine = self.pipeline.quarantine
        self.queue = WorkQueue(config.queue_size)
        self.stopping = threading.Event()
        self._reload = threading.Event()
        self.health = Health(self)
        self.scanner = Scanner(self)
        self.intake = Intake(self)
        self.pipeline.actor.requeue = self.intake.requeue  # a claim a crash took
        self.watcher = Watcher(self.intake, config.ignore)
        self._threads: list[threading.Thread] = []
        self.roots = Roots(self)
        self.pinger = WatchdogPinger(self.notifier, self.health.healthy)
        from dedupd.metrics import Metrics  # prometheus_client: a daemon's only

        self.metrics = Metrics(config, self.health.metrics_state)

    # ------------------------------------------------------------ the parts' faces

    def reconcile(self, top: Path, trigger: str = "start-up", *,
                  recursive: bool = True) -> dict[str, int]:
        """Bring the store in line with the disk under `top` (see Reconciler.run)."""
        return self.scanner.reconciler.run(top, trigger, recursive=recursive)

    def request_scan(self, *paths: Path, trigger: str, recursive: bool = True) -> None:
        self.scanner.request(*paths, trigger=trigger, recursive=recursive)

    def process(self, path: Path) -> None:
        """One file from the queue, along the pipeline's one path."""
        self.pipeline.process(path, self.intake)

    def status_line(self) -> str:
        return self.health.status_line()

    def healthy(self) -> bool:
        return self.health.healthy()

    def metrics_state(self) -> DaemonState:
        return self.health.metrics_state()

    def idle(self) -> bool:
        """Nothing queued, scanning or in flight."""
        return not self.scanner.pending() and len(self.queue) == 0 and not self.health.busy

    def wait_idle(self, timeout: float) -> bool:
        """For the demo and tests: wait until nothing is queued, scanning or in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Repair half-done moves, arm watches (then READY), start workers and the scan."""
        done = self.quarantine.reconcile(self.pipeline.rehash_entry)
        if any(done.values()):
            log.warning("quarantine journal repaired after an unclean stop: %s", done)
        for entry in self.quarantine.repaired:  # moved in before a crash, never reported
            self.pipeline.actor.report_quarantined(entry, repaired=True)
        for scope in {w.scope for w in self.config.watches}:
            self.store.warm(scope, self.config.recipe.key)  # the first file must not wait
        release_free_heap()  # what loading a big index left behind
        self.metrics.start()
        self.roots.arm(self.config)
        workers = self.config.workers or len(os.sched_getaffinity(0))
        self.queue.background_slots = max(1, workers - 1)
        for i in range(workers):
            self._spawn(self.intake.work, f"dedupd-worker-{i}")
        self._spawn(functools.partial(self.scanner.loop, False), "dedupd-scanner")
        self._spawn(functools.partial(self.scanner.loop, True), "dedupd-scanner-live")
        self.request_scan(*(w.path for w in self.config.watches), trigger="start-up")
        if threading.current_thread() is threading.main_thread():
            # Once READY is sent (or "started" logged), `systemctl reload` may come at once:
            # SIGHUP's default action would end the process before run() installs its
            # handlers.
            signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        emit(Event.STARTED, f"watching {len(self.config.watches)} roots with {workers} workers",
             roots=",".join(str(w.path) for w in self.config.watches), index=self.store.url)
        self.notifier.ready(self.status_line())
        self.pinger.start()

    def _spawn(self, target: object, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. Installed before start() announces READY:
        a reload sent right after READY must not find SIGHUP's default (terminate)."""
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def _schedule(self) -> Periodic:
        """The main loop's periodic tasks, each with its own interval."""
        tasks = Periodic()
        tasks.every(1.0, self.roots.check)
        tasks.every(1.0, self.intake.forget_moved_away)
        tasks.every(lambda: self.config.unresolved_retry_seconds, self.intake.retry_unresolved)
        tasks.every(lambda: 1.0 if self.health.store_down else 5.0, self.health.check_store)
        tasks.every(2.0, lambda: self.notifier.status(self.status_line()), name="status")
        tasks.every(lambda: self.config.log.summary_interval, emit_summary)
        tasks.every(CHECKPOINT_SECONDS, self._checkpoint)
        trimmed_at = [0]  # files processed at the last heap trim

        def trim() -> None:
            processed = self.pipeline.counts["processed"]
            if processed != trimmed_at[0]:
                release_free_heap()
                trimmed_at[0] = processed

        tasks.every(TRIM_SECONDS, trim, early=lambda: self.pipeline.counts["processed"]
                    != trimmed_at[0] and self.idle())
        tasks.every(lambda: self.config.reconcile_interval, lambda: self.request_scan(
            *(w.path for w in self.config.watches), trigger="interval"), name="reconcile")
        return tasks

    def run(self) -> int:
        """Main loop: signals, reloads and the periodic tasks; returns the exit code."""
        self.handle_signals()
        tasks = self._schedule()
        while not self.stopping.is_set():
            self.stopping.wait(0.25)
            self.health.tick = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            tasks.run_due()
            self.health.tick = time.monotonic()
        self.stop()
        return 0

    def stop(self, timeout: float = 20.0) -> None:
        """Stop watching, let in-flight files finish, close the store."""
        self.notifier.stopping()
        self.stopping.set()
        self.pinger.stop()
        self.watcher.stop()
        self.queue.close()
        self.scanner.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.store.drain()  # decisions waiting for a flush are said before "stopped"
        emit_summary()
        emit(Event.STOPPED, "stopped", **self.health.count_fields())
        self.notifier.flush()
        self.metrics.stop()
        if not any(t.is_alive() for t in self._threads):
            self.store.close()

    def reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is bad. Watches
        are re-armed only for a valid config, and a rescan covers the moment between
        the old watches and the new ones."""
        self.notifier.reloading()
        old = self.config
        try:
            new = load_config(self.config_path)
            if new.index != old.index:
                raise ConfigError(new.source, "index", "cannot change while running; restart")
            check_writable(new)  # a root outside the unit's ReadWritePaths: restart
            self.watcher.ignore = new.ignore
            self.roots.arm(new)
        except (ConfigError, WatchError) as exc:
            emit(Event.RELOAD_FAILED, f"reload failed, keeping the previous config: {exc}",
                 reason=str(exc))
            write_reload_ack(False, f"reload failed, keeping the previous config: {exc}")
            if isinstance(exc, WatchError):  # the old watches were stopped: back to them
                self.watcher.ignore = old.ignore
                with contextlib.suppress(WatchError):
                    self.roots.arm(old)
                self.request_scan(*(w.path for w in old.watches), trigger="reload")
        else:
            self.config = new
            self.pipeline.configure(new)
            self.metrics.configure(new)
            emit(Event.RELOADED, f"configuration reloaded from {new.source}",
                 roots=",".join(str(w.path) for w in new.watches))
            write_reload_ack(True, f"configuration reloaded from {new.source}")
            self.request_scan(*(w.path for w in new.watches), trigger="reload")
        self.notifier.ready(self.status_line())

    def _checkpoint(self) -> None:
        try:
            self.store.maintain()
        except StoreError as exc:
            log.warning("index checkpoint failed (the next start will be slower): %s", exc)
