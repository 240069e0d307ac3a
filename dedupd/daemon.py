"""The long-running service: watch, settle, hash, decide, act — and never lose a file.

Threads: the watchdog observer feeds a deduplicating, time-ordered work queue; a pool
of hashing threads (OpenCV decodes outside the GIL) takes paths from it; a scanner
thread reconciles roots against the store (at start, periodically, after an inotify
overflow); the main thread handles signals, STATUS, summaries and reloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import heapq
import logging
import os
import signal
import stat
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.access import check_writable
from dedupd.config import Config, ConfigError, load_config
from dedupd.events import Event, emit, emit_summary
from dedupd.pipeline import Pipeline
from dedupd.selection import name_ignored, wanted_test
from dedupd.service import Notifier, WatchdogPinger, write_reload_ack
from dedupd.store import Store, StoreError, open_store
from dedupd.store.base import IN_ROOT_STATUSES, UNRESOLVED
from dedupd.watcher import Root, Watcher, WatchError

if TYPE_CHECKING:
    from dedupd.metrics import DaemonState

log = logging.getLogger("dedupd.daemon")

# How long a file must stay unchanged, without a close after its last write, before it
# is judged as it is: a slow writer may pause far longer than settle_seconds.
UNFINISHED_GRACE = 60.0
# How long a hashed file waits for files that arrived before it and are still being
# hashed (keep: first); past it, the pipeline's arrival check still applies.
TURN_SECONDS = 30.0
# How often the store persists its in-memory index: after a SIGKILL, a start catches up
# on at most this much work.
CHECKPOINT_SECONDS = 900.0


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent from musl and others
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()
# Reconcile triggers that come from live events: their files are live work, and they are
# served by their own scanner, not behind a reconcile of a whole root.
LIVE_TRIGGERS = ("directory", "queue full")
# The periodic safety net compares 1/FULL_EVERY of the unchanged directories in full.
FULL_EVERY = 24
# A directory modified this close to its listing may change again within one tick of the
# file system's timestamps: its mtime proves nothing yet.
RACY_NS = 2_000_000_000
# The background scanner lets due live files through every this many directory entries.
YIELD_EVERY = 128
# Vanished records held before they are forgotten (waiting for the queue to drain).
VANISHED_BATCH = 50_000
# Trim at least this often while files keep coming (otherwise whenever the queue empties).
TRIM_SECONDS = 30.0


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
        self._heaps: tuple[list[tuple[float, int, Path]], ...] = ([], [])
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def put(self, path: Path, delay: float = 0.0, *, block: bool = False,
            background: bool = False, arrival: float | None = None,
            since: float | None = None, keep_place: bool = False) -> bool:
        """Queue path (a live event unless `background`); False if refused (full or
        closed). A live event for a path waiting as background work promotes it; a
        background put for a path already waiting changes nothing. keep_place (a retry
        after a store outage): due as of its first queuing, ahead of later files."""
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
                due = now + delay if delay > 0 else min(old[0], now)
            if keep_place and path in self._arrived:
                due = min(due, self._arrived[path])
            self._due[path] = (due, background)
            if path not in self._arrived:
                self._arrived[path] = now
                self.arrivals += 1
                self._arrival[path] = (time.time() if arrival is None else arrival,
                                       now if since is None else since)
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
        """Drop superseded heap tops; hold those a worker has until its done()."""
        for background, heap in enumerate(self._heaps):
            while heap and (self._due.get(heap[0][2]) != (heap[0][0], background)
                            or heap[0][2] in self._taken):
                due, _, held = heapq.heappop(heap)
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
                live = self._heaps[0]
                if now >= deadline or not (False in self._taken.values()
                                           or (live and live[0][0] <= now)):
                    return
                self._cond.wait(deadline - now)

    def get(self, timeout: float = 0.5) -> Path | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                self._tidy()
                slots = self.background_slots
                for background, heap in enumerate(self._heaps):
                    if background and slots is not None and (
                            sum(self._taken.values()) >= slots
                            or False in self._taken.values()):
                        # The workers left are kept for live events, and a live file
                        # being decided has the process (and its GIL) to itself.
                        continue
                    if heap and heap[0][0] <= now:
                        _, _, path = heapq.heappop(heap)
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
        self.watcher = Watcher(self, config.ignore)
        self._stop = threading.Event()
        self._reload = threading.Event()
        # Scans waiting, path -> (trigger, recursive): for the background scanner (whole
        # roots) and for the live one (directories named by live events).
        self._scan_requests: dict[bool, dict[Path, tuple[str, bool]]] = {False: {}, True: {}}
        self._scan_cond = threading.Condition()
        self._scanning = 0
        self._progress: dict[Path, dict[str, int]] = {}  # roots being reconciled: counts
        self._last_seen: dict[Path, int] = {}  # files seen by a root's last full reconcile
        # Directories fully compared, whose mtime says nothing changed since: path ->
        # (inode, mtime_ns, files seen). The periodic safety net only lists these.
        self._dir_marks: dict[str, tuple[int, int, int]] = {}
        self._interval_runs: dict[Path, int] = {}
        self._busy: dict[int, float] = {}  # worker thread id -> time its current file started
        # When a path was last reported complete (closed after writing, or renamed in):
        # a short or broken file is final only after that, or after a longer grace.
        self._closed: dict[Path, float] = {}
        self._unreadable: set[str] = set()  # directories already reported unreadable
        self._threads: list[threading.Thread] = []
        self._root_ids: dict[Path, tuple[int, int] | None] = {}  # (st_dev, st_ino) armed
        self._tick = time.monotonic()
        # While the store is unreachable: why and since when (workers pause, files wait).
        self._store_down: tuple[str, float] | None = None
        self._store_lock = threading.Lock()
        self.pinger = WatchdogPinger(self.notifier, self.healthy)
        self.last_reconcile: float | None = None  # Unix time of the last finished root scan
        from dedupd.metrics import Metrics, Refreshed  # prometheus_client: a daemon's only

        self.metrics = Metrics(config, self.metrics_state)
        # A count over the store: at most once a minute, whatever the scrape interval.
        self._pending_count = Refreshed(lambda: self.store.with_status(UNRESOLVED, 0)[1], 60)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Repair half-done moves, arm watches (then READY), start workers and the scan."""
        done = self.quarantine.reconcile(self.pipeline.rehash_entry)
        if any(done.values()):
            log.warning("quarantine journal repaired after an unclean stop: %s", done)
        for scope in {w.scope for w in self.config.watches}:
            self.store.warm(scope, self.config.recipe.key)  # the first file must not wait
        release_free_heap()  # what loading a big index left behind
        self.metrics.start()
        self._arm(self.config)
        workers = self.config.workers or len(os.sched_getaffinity(0))
        self.queue.background_slots = max(1, workers - 1)
        for i in range(workers):
            self._spawn(self._work, f"dedupd-worker-{i}")
        self._spawn(functools.partial(self._scan_loop, False), "dedupd-scanner")
        self._spawn(functools.partial(self._scan_loop, True), "dedupd-scanner-live")
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

    def _roots(self, config: Config | None = None) -> list[Root]:
        return [Root(w.path, w.recursive) for w in (config or self.config).watches]

    def _arm(self, config: Config, *, present_only: bool = False) -> None:
        """Watch config's roots (only those that exist, if present_only) and note which
        directory each one is, to notice it being deleted or replaced."""
        roots = self._roots(config)
        if present_only:
            roots = [r for r in roots if r.path.is_dir()]
        self.watcher.arm(roots)
        self._root_ids = {r.path: _dir_id(r.path) for r in self._roots(config)}

    def check_roots(self) -> None:
        """A watched root deleted, moved away or replaced takes its inotify watches with
        it (IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED): say so once, and once a directory
        is at the path again, re-arm the watches and rescan (main loop, every second)."""
        back = False
        for path in list(self._root_ids):
            now = _dir_id(path)
            with self._scan_cond:  # dir_deleted() marks roots lost from the watcher thread
                armed = self._root_ids.get(path)
                if now == armed:
                    continue
                if now is not None:
                    self._root_ids[path] = now
            if now is None:
                self._root_lost(path)
                continue
            log.warning("%s: watched root is %s; watching it again and rescanning", path,
                        "back" if armed is None else "a new directory (replaced)")
            back = True
        if back:
            try:
                self._arm(self.config, present_only=True)
            except WatchError as exc:
                log.error("cannot re-arm the watches (retried): %s", exc)
                for path in self._root_ids:
                    self._root_ids[path] = None  # compare afresh at the next check
                return
            self.request_scan(*(w.path for w in self.config.watches), trigger="root back")

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. Installed before start() announces READY:
        a reload sent right after READY must not find SIGHUP's default (terminate)."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def run(self) -> int:
        """Main loop: signals, STATUS, summaries, periodic reconciliation; returns exit code."""
        self.handle_signals()
        last_status = last_summary = last_reconcile = last_ping = last_checkpoint = \
            last_trim = last_roots = time.monotonic()
        trimmed_at = 0  # files processed at the last heap trim
        while not self._stop.is_set():
            self._stop.wait(0.25)
            now = self._tick = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if now - last_roots >= 1.0:
                self.check_roots()
                last_roots = now
            if now - last_ping >= (1.0 if self._store_down else 5.0):
                self.check_store()
                last_ping = now = self._tick = time.monotonic()
            if now - last_status >= 2.0:
                self.notifier.status(self.status_line())
                last_status = now
            if now - last_summary >= self.config.log.summary_interval:
                emit_summary()
                last_summary = now
            if now - last_checkpoint >= CHECKPOINT_SECONDS:
                self._checkpoint()
                last_checkpoint = now
            processed = self.pipeline.counts["processed"]
            if processed != trimmed_at and (now - last_trim >= TRIM_SECONDS or self.idle()):
                release_free_heap()
                trimmed_at, last_trim = processed, now
            interval = self.config.reconcile_interval
            if interval and now - last_reconcile >= interval:
                self.request_scan(*(w.path for w in self.config.watches), trigger="interval")
                last_reconcile = now
        self.stop()
        return 0

    def stop(self, timeout: float = 20.0) -> None:
        """Stop watching, let in-flight files finish, close the store."""
        self.notifier.stopping()
        self._stop.set()
        self.pinger.stop()
        self.watcher.stop()
        self.queue.close()
        with self._scan_cond:
            self._scan_cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        emit_summary()
        emit(Event.STOPPED, "stopped", **self._count_fields())
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
            self._arm(new)
        except (ConfigError, WatchError) as exc:
            emit(Event.RELOAD_FAILED, f"reload failed, keeping the previous config: {exc}",
                 reason=str(exc))
            write_reload_ack(False, f"reload failed, keeping the previous config: {exc}")
            if isinstance(exc, WatchError):  # the old watches were stopped: back to them
                self.watcher.ignore = old.ignore
                with contextlib.suppress(WatchError):
                    self._arm(old)
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
            self.store.checkpoint()
        except StoreError as exc:
            log.warning("index checkpoint failed (the next start will be slower): %s", exc)

    # ------------------------------------------------------------ store outages

    def _store_failed(self, exc: StoreError, **fields: object) -> None:
        """The store failed a call: say so once per outage; workers then pause (files
        wait in the queue) until check_store() sees it answer again."""
        with self._store_lock:
            first = self._store_down is None
            since = time.time() if self._store_down is None else self._store_down[1]
            self._store_down = (str(exc), since)  # the latest reason, the outage's start
        if first:
            emit(Event.STORE_UNAVAILABLE, f"store unavailable; files wait in the queue and "
                 f"are retried: {exc}", reason=str(exc), **fields)  # type: ignore[arg-type]
            self.notifier.status(self.status_line())
        else:
            log.debug("store still unavailable: %s", exc)

    def check_store(self) -> bool:
        """Ping the store (main loop): notice outages while idle, and recoveries."""
        try:
            self.store.ping()
            for entry in self.quarantine.finish_moves():
                self.pipeline.actor.report_quarantined(entry)
        except StoreError as exc:
            self._store_failed(exc)
            return False
        with self._store_lock:
            down, self._store_down = self._store_down, None
        if down is not None:
            emit(Event.STORE_RECOVERED, f"store available again after "
                 f"{time.time() - down[1]:.0f} s; resuming the queue ({len(self.queue)} "
                 "files waiting)", reason=down[0])
            self.notifier.status(self.status_line())
        return True

    # ------------------------------------------------------------ health and status

    def healthy(self) -> bool:
        """Progress, for the systemd watchdog: main loop alive, no worker wedged."""
        now = time.monotonic()
        if now - self._tick > 10 or not self.watcher.alive():
            return False
        return all(now - started < self.config.stall_seconds
                   for started in list(self._busy.values()))

    def idle(self) -> bool:
        with self._scan_cond:
            scanning = self._scanning or any(self._scan_requests.values())
        return not scanning and len(self.queue) == 0 and not self._busy

    def wait_idle(self, timeout: float) -> bool:
        """For the demo and tests: wait until nothing is queued, scanning or in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.05)
        return self.idle()

    def status_line(self) -> str:
        c = self.pipeline.counts
        scan = self._scan_status()
        down = self._store_down
        outage = (f"store unavailable since {time.strftime('%H:%M:%S', time.localtime(down[1]))}"
                  f", retrying: {down[0]}; " if down else "")
        sizes = [self.store.live_count(scope, self.config.recipe.key)
                 for scope in {w.scope for w in self.config.watches}]
        indexed = f"{sum(sizes)} indexed, " if sizes and None not in sizes else ""
        return (f"{outage}{len(self.config.watches)} roots{scan}; {indexed}"
                f"{c['processed']} processed, {c['accepted']} accepted, "
                f"{c['quarantined']} quarantined, {c['rejected']} rejected; "
                f"queue {len(self.queue)}")

    def metrics_state(self) -> DaemonState:
        """The gauges of the metrics, read when they are scraped."""
        from dedupd.metrics import DaemonState

        scopes = {w.scope for w in self.config.watches}
        indexed = {s: self.store.live_count(s, self.config.recipe.key) for s in scopes}
        return DaemonState(
            queue_depth=len(self.queue), queued_total=self.queue.arrivals,
            store_available=self._store_down is None,
            indexed={s: n for s, n in indexed.items() if n is not None},
            breakers_open={str(root): b.open for root, b in self.pipeline.breakers.items()},
            last_reconcile=self.last_reconcile, pending_quarantines=self._pending_count())

    def _scan_status(self) -> str:
        """' (scanning); reconciling /data: 412,000 files seen, 41% of the last count', or
        ' (scanning)' alone between a request and its start (READY's status)."""
        parts = []
        for root, counts in list(self._progress.items()):
            last = self._last_seen.get(root)
            share = f", {min(99, 100 * counts['seen'] // last)}% of the last count" \
                if last else ""
            parts.append(f"{root}: {counts['seen']:,} files seen{share}")
        if parts:
            return f" (scanning); reconciling {'; '.join(parts)}"
        with self._scan_cond:
            pending = self._scanning or any(self._scan_requests.values())
        return " (scanning)" if pending else ""

    def _count_fields(self) -> dict[str, object]:
        return {f"count_{k}": v for k, v in self.pipeline.counts.items()}

    # ------------------------------------------------------------ watcher sink

    def file_ready(self, path: Path) -> None:
        if self.queue.put(path):
            self._closed[path] = time.time()
        else:
            self._queue_full(path)

    def file_changing(self, path: Path) -> None:
        if not self.queue.put(path, self.config.settle_seconds):
            self._queue_full(path)

    def _queue_full(self, path: Path) -> None:
        """A live event found the queue full: list that file's directory once the queue
        has room (not the whole root: one directory holds whatever was refused)."""
        if self.config.watch_for(path) is not None:
            self.request_scan(path.parent, trigger="queue full", recursive=False)

    def _store_call_failed(self, exc: StoreError, path: Path) -> None:
        """A watcher callback could not update the store: the root's rescan will."""
        self._store_failed(exc, path=str(path))
        watch = self.config.watch_for(path)
        if watch is not None:
            self.request_scan(watch.path, trigger="store error")

    def file_deleted(self, path: Path) -> None:
        self.queue.discard(path)
        self._closed.pop(path, None)
        watch = self.config.watch_for(path)
        if watch is None:
            return
        try:
            with self.store.locked(watch.scope):
                rec = self.store.get_by_path(str(path))
                if rec is not None and rec.status in IN_ROOT_STATUSES and not path.exists():
                    self.store.delete(rec.id)  # type: ignore[arg-type]
                if not os.path.lexists(path):
                    self.store.forget_rejection(str(path))
        except StoreError as exc:
            self._store_call_failed(exc, path)

    def file_moved(self, src: Path, dst: Path) -> None:
        old, new = self.config.watch_for(src), self.config.watch_for(dst)
        if old is None or new is None or old.scope != new.scope:
            self.file_deleted(src)
            self.file_ready(dst)
            return
        try:
            with self.store.locked(new.scope):
                rec = self.store.get_by_path(str(src))
                if rec is not None and self.store.get_by_path(str(dst)) is None:
                    self.store.update(rec.with_(path=str(dst)))
        except StoreError as exc:
            self._store_call_failed(exc, dst)
        self.file_ready(dst)  # a no-op if the record now matches the file

    def dir_moved(self, src: Path, dst: Path) -> None:
        new = self.config.watch_for(dst)
        try:
            for rec in list(self.store.iter_records(prefix=str(src))):
                moved = dst / Path(rec.path).relative_to(src)
                if new is not None and rec.scope == new.scope and \
                        rec.status in IN_ROOT_STATUSES:
                    with self.store.locked(rec.scope):
                        if self.store.get_by_path(str(moved)) is None:
                            self.store.update(rec.with_(path=str(moved)))
        except StoreError as exc:
            self._store_call_failed(exc, dst)
        self.request_scan(dst, trigger="directory")

    def dir_arrived(self, path: Path) -> None:
        self.request_scan(path, trigger="directory")

    def dir_deleted(self, path: Path) -> None:
        if path in self._root_ids:  # IN_DELETE_SELF: a new directory may get its inode
            self._root_lost(path)
        self.request_scan(path, trigger="directory")

    def _root_lost(self, path: Path) -> None:
        """A watched root went away: say so once; check_roots() re-arms it once back."""
        with self._scan_cond:
            if self._root_ids.get(path) is None:
                return
            self._root_ids[path] = None
        log.warning("%s: watched root is gone (deleted or moved away); files there are "
                    "not watched until it is back", path)

    def overflow(self) -> None:
        roots = [w.path for w in self.config.watches]
        emit(Event.OVERFLOW_RESCAN, "inotify queue overflowed: events were lost; rescanning "
             f"{len(roots)} roots (raise fs.inotify.max_queued_events if this recurs)",
             roots=",".join(map(str, roots)))
        self.request_scan(*roots, trigger="overflow")

    # ------------------------------------------------------------ scanning

    def request_scan(self, *paths: Path, trigger: str, recursive: bool = True) -> None:
        """Reconcile these directories soon. Live triggers (a directory event, a full
        queue) go to the live scanner, whose files are live events; the others to the
        background scanner."""
        live = trigger in LIVE_TRIGGERS
        with self._scan_cond:
            requests = self._scan_requests[live]
            for path in paths:
                old = requests.get(path)
                if old is not None:  # keep the more thorough of the two
                    trigger = old[0] if trigger == "interval" else trigger
                    recursive = recursive or old[1]
                requests[path] = (trigger, recursive)
            self._scan_cond.notify_all()

    def _next_scan(self, live: bool) -> tuple[Path, str, bool] | None:
        """The shallowest requested directory; requests it covers are merged into it (a
        periodic run that covers a request for a full comparison becomes one)."""
        with self._scan_cond:
            requests = self._scan_requests[live]
            while not requests and not self._stop.is_set():
                self._scan_cond.wait(1.0)
            if self._stop.is_set():
                return None
            path = min(requests, key=lambda p: len(p.parts))
            trigger, recursive = requests.pop(path)
            if recursive:
                for other in [p for p in requests if path in p.parents]:
                    covered = requests.pop(other)[0]
                    trigger = covered if trigger == "interval" else trigger
            self._scanning += 1
            return path, trigger, recursive

    def _scan_loop(self, live: bool) -> None:
        while (request := self._next_scan(live)) is not None:
            path, trigger, recursive = request
            try:
                self.reconcile(path, trigger, recursive=recursive)
            except StoreError as exc:
                self._store_failed(exc, root=str(path))
                while self._store_down and not self._stop.is_set():
                    self._stop.wait(0.5)
                self.request_scan(path, trigger=trigger, recursive=recursive)
            except Exception:
                log.exception("reconciliation of %s failed", path)
            finally:
                with self._scan_cond:
                    self._scanning -= 1

    def reconcile(self, top: Path, trigger: str = "start-up", *,
                  recursive: bool = True) -> dict[str, int]:
        """Bring the store in line with the disk under `top`: queue new or changed files
        (size or mtime differ), forget records whose files are gone, and count records
        whose files were found at a new path. Runs while watching, so nothing is missed.

        One pass, a directory at a time: one listing, one bulk store query for its
        children, filters on names; memory follows the largest directory, never the
        number of changed files (the queue's bound holds the walk back). The periodic
        safety net (trigger "interval") only lists directories whose mtime is unchanged
        since their last full comparison (no file was added, removed or renamed there;
        inotify reports writes in place while the daemon runs), except a rolling
        1/FULL_EVERY of them, so every directory is compared in full now and then."""
        counts = {"seen": 0, "queued": 0, "forgotten": 0, "moved": 0, "dirs": 0,
                  "unchanged_dirs": 0}
        if self.config.watch_for(top) is None:
            return counts
        live = trigger in LIVE_TRIGGERS
        quiet = trigger == "directory"  # part of handling a live event
        run = 0
        if trigger == "interval":
            run = self._interval_runs[top] = self._interval_runs.get(top, 0) + 1
        started, cpu = time.monotonic(), time.thread_time()
        if quiet:
            log.debug("reconciling %s (%s)", top, trigger)
        else:
            emit(Event.RECONCILE_STARTED, f"reconciling {top} ({trigger})", root=str(top),
                 trigger=trigger)
            self._progress[top] = counts
        vanished: list[tuple[int, str]] = []  # (id, path) of records whose file is gone
        stack = [top]
        try:
            while stack and not self._stop.is_set():
                self._reconcile_dir(stack.pop(), counts, stack, vanished, live=live,
                                    recursive=recursive, run=run, since=started,
                                    settle=self.config.settle_seconds if quiet else 0.0)
                if len(vanished) >= VANISHED_BATCH:
                    self._forget(vanished, counts, live)
            self._forget(vanished, counts, live)
            for rejection in self.store.rejections(str(top)):
                if not os.path.lexists(rejection.path):  # said once, until it changes
                    self.store.forget_rejection(rejection.path)
        finally:
            self._progress.pop(top, None)
        if self._stop.is_set():
            return counts
        if any(w.path == top for w in self.config.watches):
            self.last_reconcile = time.time()
            if trigger != "interval":
                self._last_seen[top] = counts["seen"]
        duration = time.monotonic() - started
        text = (f"reconciled {top} ({trigger}) in {duration:.1f} s: {counts['seen']} files "
                f"seen, {counts['queued']} queued, {counts['forgotten']} forgotten, "
                f"{counts['moved']} moved")
        if quiet:
            log.debug("%s", text)
        else:
            if counts["unchanged_dirs"]:
                text += f"; {counts['unchanged_dirs']} of {counts['dirs']} directories unchanged"
            emit(Event.RECONCILE_FINISHED, text, root=str(top), trigger=trigger,
                 duration=round(duration, 3), cpu=round(time.thread_time() - cpu, 3),
                 **counts)  # type: ignore[arg-type]
        return counts

    def _reconcile_dir(self, directory: Path, counts: dict[str, int], stack: list[Path],
                       vanished: list[tuple[int, str]], *, live: bool, recursive: bool,
                       run: int, settle: float, since: float | None = None) -> None:
        """Compare one directory with its records; push its subdirectories on `stack`.
        Empty files are queued `settle` seconds ahead: a directory that just appeared may
        hold files created but not yet written (their close event makes them due at once),
        while a directory moved in whole is complete."""
        config = self.config
        watch = config.watch_for(directory)
        if watch is None:
            return
        name = str(directory)
        root = str(watch.path)
        if not watch.recursive and name != root:
            return
        below = recursive and watch.recursive
        try:
            st = os.stat(name) if name == root else os.lstat(name)
            if not stat.S_ISDIR(st.st_mode):  # replaced by a file or a symlink
                self._vanished_under(directory, vanished, gone=False)
                return
            listing = os.scandir(name)
        except FileNotFoundError:  # deleted: its records go
            self._vanished_under(directory, vanished, gone=True)
            return
        except OSError as exc:  # unreadable: leave its records alone
            self._unreadable_dir(directory, exc)
            return
        counts["dirs"] += 1
        ignored = name_ignored(config.ignore)
        mark = self._dir_marks.get(name)
        if run and mark is not None and mark[:2] == (st.st_ino, st.st_mtime_ns) and \
                zlib.crc32(os.fsencode(name)) % FULL_EVERY != run % FULL_EVERY:
            counts["unchanged_dirs"] += 1
            counts["seen"] += mark[2]
            if below:
                with listing:
                    stack.extend(Path(e.path) for e in listing if not ignored(e.name)
                                 and e.is_dir(follow_symlinks=False))
            return
        files, store_subdirs = self.store.children(name)
        wanted_path = wanted_test(config.policy_for(watch))
        prefix = name[len(root) + 1:] + "/" if name != root else ""
        walked: set[str] = set()
        seen = 0
        with listing:
            for n, entry in enumerate(listing):
                if not live and n % YIELD_EVERY == 0:
                    self.queue.yield_to_live(0.05)
                entry_name = entry.name
                if ignored(entry_name):
                    continue
                try:
                    is_dir = entry.is_dir()  # a symlink to a directory: neither walked nor a file
                except OSError:
                    is_dir = False
                if is_dir:
                    if below and not entry.is_symlink():
                        walked.add(entry_name)
                        stack.append(Path(entry.path))
                    continue
                if not wanted_path(prefix + entry_name):
                    continue
                seen += 1
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # listable but not searchable: nothing to stat
                    self._unreadable_dir(directory, exc)
                    return
                known = files.pop(entry_name, None)
                if known is not None and known[0] == est.st_size and \
                        known[1] == est.st_mtime_ns and known[3] != UNRESOLVED:
                    continue  # unresolved duplicates are decided again
                if known is None and self.pipeline.actor.known_reject(Path(entry.path), est):
                    continue
                self.queue.put(Path(entry.path), 0.0 if est.st_size else settle, block=True,
                               background=not live, arrival=est.st_mtime, since=since)
                counts["queued"] += 1
        counts["seen"] += seen
        # Records left: files gone, or present but not wanted (kept, as before).
        for entry_name, (_, _, rid, status) in files.items():
            path = os.path.join(name, entry_name)
            if status in IN_ROOT_STATUSES and not os.path.lexists(path):
                vanished.append((rid, path))
        for sub in store_subdirs if recursive else ():  # a shallow scan leaves them
            if sub not in walked:
                self._vanished_under(directory / sub, vanished,
                                     gone=not os.path.lexists(os.path.join(name, sub)))
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            self._dir_marks[name] = (st.st_ino, st.st_mtime_ns, seen)
        else:  # changed within the timestamps' granularity of now: compare again next time
            self._dir_marks.pop(name, None)

    def _vanished_under(self, directory: Path, vanished: list[tuple[int, str]], *,
                        gone: bool) -> None:
        """Records below a directory the walk does not enter: all of them if it is gone,
        else those whose file is gone (an ignored or unwalked directory)."""
        if gone:
            name = str(directory)
            for key in [k for k in self._dir_marks if k == name or k.startswith(name + "/")]:
                del self._dir_marks[key]
        for rec in self.store.iter_records(prefix=str(directory)):
            if rec.status in IN_ROOT_STATUSES and (gone or not os.path.lexists(rec.path)):
                vanished.append((rec.id, rec.path))  # type: ignore[arg-type]

    def _unreadable_dir(self, path: Path, exc: OSError) -> None:
        """One line per unreadable directory, once (until a restart); the walk goes on."""
        key = str(path)
        if key not in self._unreadable and len(self._unreadable) < 100_000:
            self._unreadable.add(key)
            log.warning("%s: cannot read this directory, its files are skipped: %s", path,
                        exc.strerror or exc)

    def _forget(self, vanished: list[tuple[int, str]], counts: dict[str, int],
                live: bool) -> None:
        """Drop the records of vanished files, once the files queued so far are done:
        one of them may be such a file at a new path, whose record the pipeline then
        moved (matched by content digest) instead of indexing a newcomer. A live scan
        does not wait (live events keep coming; its moves are the watcher's events)."""
        if not vanished:
            return
        if not live:
            self.queue.wait_drained(True, self._stop)
        if self._stop.is_set():
            return
        for rid, path in vanished:
            rec = self.store.get(rid)
            if rec is None:
                continue
            if rec.path != path:
                counts["moved"] += 1
                continue
            with self.store.locked(rec.scope):
                again = self.store.get(rid)
                if again is not None and again.path == path and not os.path.lexists(path):
                    self.store.delete(rid)
                    counts["forgotten"] += 1
        vanished.clear()

    # ------------------------------------------------------------ workers

    def _work(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            if self._store_down is not None:  # files wait in the queue until it is back
                self._stop.wait(0.5)
                continue
            path = self.queue.get(0.5)
            if path is None:
                continue
            self._busy[me] = time.monotonic()
            self.metrics.arrived(self.queue.arrived(path))
            try:
                self.process(path)
            except StoreError as exc:
                # Nothing was decided, or the decision is in the store already (process()
                # starts by asking the store about the path): retrying is safe.
                self._store_failed(exc, path=str(path))
                if not self.queue.put(path, block=False, keep_place=True):
                    self._queue_full(path)
            except Exception:
                log.exception("processing %s failed; it stays where it is", path)
                self._dir_marks.pop(str(path.parent), None)  # the safety net retries it
            finally:
                self._busy.pop(me, None)
                self.queue.done(path)
                if path not in self.queue:  # not waiting to be looked at again
                    self._closed.pop(path, None)

    def process(self, path: Path) -> None:
        """One file from the queue, along the pipeline's one path."""
        self.pipeline.process(path, self)

    # ------------------------------------------------------------ the pipeline's intake

    def unreadable(self, directory: Path, exc: OSError) -> None:
        self._unreadable_dir(directory, exc)

    def hashed(self, seconds: float) -> None:
        self.metrics.observe_hash(seconds)

    def turn(self, path: Path) -> tuple[float | None, float | None]:
        self.queue.wait_turn(path, TURN_SECONDS)
        self._closed.pop(path, None)
        return self.queue.arrival(path)

    def unfinished(self, path: Path, st: os.stat_result) -> bool:
        wait = self._final(path, st)
        if wait > 0:  # not provably finished: look again once it would be
            if not self.queue.put(path, wait + 0.05):
                self._queue_full(path)
            return True
        self._closed.pop(path, None)
        return False

    def changed(self, path: Path, before: os.stat_result) -> bool:
        """Still being written (size, mtime or ctime moved since `before`)? Then it is
        queued again to settle, and nothing is decided about it now."""
        try:
            now = path.stat()
        except OSError:
            return True  # gone or replaced: its own events bring it back
        if (now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino) == (
                before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino):
            return False
        self.file_changing(path)
        return True

    def _final(self, path: Path, st: os.stat_result) -> float:
        """0 if a file that looks short or broken is provably finished: unchanged for
        settle_seconds since a close or rename-in that came after its last change, or
        for UNFINISHED_GRACE without one (a writer may pause). Else seconds to wait."""
        changed = max(st.st_mtime, st.st_ctime)
        closed = self._closed.get(path)
        grace = self.config.settle_seconds if closed is not None and closed >= changed \
            else max(UNFINISHED_GRACE, self.config.settle_seconds)
        return max(0.0, changed + grace - time.time())


def _dir_id(path: Path) -> tuple[int, int] | None:
    """Which directory is at path now (device, inode); None if none is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
