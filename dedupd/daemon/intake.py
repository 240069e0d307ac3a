"""Files coming in: the watcher's events (dedupd.watcher.Sink) turned into queued paths
and store updates for moves and deletions; the workers that take paths from the queue
along the pipeline; and what the pipeline asks its Intake (is a file still being
written, is it its turn: keep: first goes by arrival).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.events import Event, emit
from dedupd.store import StoreError
from dedupd.store.base import UNRESOLVED, RecordGone

if TYPE_CHECKING:
    from dedupd.daemon.core import Daemon

log = logging.getLogger("dedupd.daemon")

# How long a hashed file waits for files that arrived before it and are still being
# hashed (keep: first); past it, the pipeline's arrival check still applies.
TURN_SECONDS = 30.0
# A file moved to where no watch sees it (out of the roots, or into a directory made
# just before and not watched yet) keeps its record at least this long, and until the
# live work is done (or at most MOVED_AWAY_MAX): found at its new path, it is then
# recognised by its digest and its record moved, not decided anew as a new arrival.
MOVED_AWAY_GRACE = 2.0
MOVED_AWAY_MAX = 120.0
# How many duplicates left unresolved (a quarantine full, read-only or unwritable) one
# retry queues (config unresolved_retry_seconds says how often).
RETRY_UNRESOLVED_BATCH = 1000
# A path retried and still unresolved waits twice as long before the next retry (a
# quarantine that stays full costs no decode per file every half minute), up to this.
RETRY_UNRESOLVED_MAX = 3600.0
# A file a moved-in directory's listing named waits this long before it is due, unless
# the directory's scan (which queues its files oldest first, due at once) comes first.
FOUND_FALLBACK_SECONDS = 3.0
# A file the store refuses this many times in a row while it answers pings is let go.
FILE_STRIKES = 5
# How long the main loop spends on deferred forgets per pass (a mass move out of the
# roots is forgotten over several passes; the watchdog's tick must not wait).
FORGET_PASS_SECONDS = 0.5


class Intake:
    """The watcher's Sink and the pipeline's Intake, for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # When a path was last reported complete (closed after writing, or renamed in):
        # a short or broken file is final only after that, or after a longer grace.
        self.closed: dict[Path, float] = {}
        # Files moved away to an unknown place: path -> when (monotonic); see
        # MOVED_AWAY_GRACE.
        self.moved_away: dict[Path, float] = {}
        self._lock = threading.Lock()
        # Unresolved duplicates retried: path -> (not before, back-off) in monotonic time.
        self._retried: dict[str, tuple[float, float]] = {}

    # ------------------------------------------------------------ watcher sink

    def _arrived_again(self, path: Path) -> None:
        """A path moved away has a file again: its deferred forget is off (the record
        is looked at with the new file)."""
        if self.moved_away:
            with self._lock:
                self.moved_away.pop(path, None)

    def file_ready(self, path: Path) -> None:
        self._arrived_again(path)
        if self.daemon.queue.put(path):
            self.closed[path] = time.time()
        else:
            self._queue_full(path)

    def requeue(self, path: Path, arrival: float) -> None:
        """Decide a file again (its claim was lost), keeping its arrival (keep: first)."""
        if not self.daemon.queue.put(path, arrival=arrival):
            self._queue_full(path)

    def file_changing(self, path: Path) -> None:
        self._arrived_again(path)
        if not self.daemon.queue.put(path, self.daemon.config.settle_seconds):
            self._queue_full(path)

    def file_found(self, path: Path) -> None:
        """A file of a directory that moved in in whole (the watcher listed it): it did
        not arrive now but when it was written, as for a file a scan finds (keep: first
        goes by its mtime). Listing order is no arrival order: a later copy listed first
        would otherwise be decided first, then replaced by its original."""
        self._arrived_again(path)
        try:
            written = min(path.lstat().st_mtime, time.time())
        except OSError:
            return  # gone again, or its directory unreadable: the scan of it says why
        # The directory's own scan (dir_arrived) normally queues it first, due at once
        # and with its siblings oldest first; this is the fallback, later.
        if not self.daemon.queue.put(path, max(self.daemon.config.settle_seconds,
                                               FOUND_FALLBACK_SECONDS), arrival=written,
                                     postpone=False):  # never later than the scan put it
            self._queue_full(path)

    def _queue_full(self, path: Path) -> None:
        """A live event found the queue full: list that file's directory once the queue
        has room (not the whole root: one directory holds whatever was refused)."""
        if self.daemon.config.watch_for(path) is not None:
            self.daemon.scanner.request(path.parent, trigger="queue full", recursive=False)

    def _store_call_failed(self, exc: StoreError, path: Path) -> None:
        """A watcher callback could not update the store: the root's rescan will."""
        self.daemon.health.store_failed(exc, path=str(path))
        watch = self.daemon.config.watch_for(path)
        if watch is not None:
            self.daemon.scanner.request(watch.path, trigger="store error")

    def file_deleted(self, path: Path) -> None:
        self.daemon.queue.discard(path)
        self.closed.pop(path, None)
        self._forget_record(path)

    def _forget_record(self, path: Path) -> None:
        """Drop path's record and rejection if its file is still gone (checked under the
        scope's lock: a new file at the path keeps the record, for its own decision)."""
        watch = self.daemon.config.watch_for(path)
        if watch is None:
            return
        try:
            self.daemon.store.forget(watch.scope, str(path), lambda: not path.exists())
            if not os.path.lexists(path):
                self.daemon.store.forget_rejection(str(path))
        except StoreError as exc:
            self._store_call_failed(exc, path)

    def file_moved_away(self, path: Path) -> None:
        """Moved to where no watch sees it: forgotten later (forget_moved_away), unless
        the file turns up at a new path in a root meanwhile."""
        if self.daemon.config.watch_for(path) is None:
            self.daemon.queue.discard(path)
            self.closed.pop(path, None)
        else:
            self._defer_forget([path])

    def _defer_forget(self, paths: list[Path]) -> None:
        """Out of the queue now; their records forgotten after the grace (see
        MOVED_AWAY_GRACE), a path already waiting keeping its first time."""
        now = time.monotonic()
        for p in paths:
            self.daemon.queue.discard(p)
            self.closed.pop(p, None)
        with self._lock:
            for p in paths:
                self.moved_away.setdefault(p, now)

    def forget_moved_away(self) -> None:
        """(Main loop.) Forget the files moved away that did not turn up elsewhere:
        past the grace once no live work is left (a directory's scan, files due or in
        a worker), or past MOVED_AWAY_MAX whatever the live work."""
        d = self.daemon
        if not self.moved_away or d.health.store_down is not None:
            return  # an outage's rescan (store error) settles them once it is back
        now = time.monotonic()
        idle = not d.queue.live_due() and not d.scanner.live_pending()
        with self._lock:
            due = [p for p, when in self.moved_away.items() if now - when >= MOVED_AWAY_MAX
                   or (idle and now - when >= MOVED_AWAY_GRACE)]
        for path in due:
            with self._lock:
                if self.moved_away.pop(path, None) is None:
                    continue  # a file arrived at the path meanwhile
            self._forget_record(path)  # only if still gone; a record moved meanwhile stays
            if time.monotonic() - now > FORGET_PASS_SECONDS or d.health.store_down:
                return  # the rest at the next pass

    def retry_unresolved(self) -> None:
        """(Main loop.) Queue the duplicates left in place because their removal failed
        (the newest RETRY_UNRESOLVED_BATCH; older ones at the next rescan), as background
        work, by arrival; each path backs off (doubling) while it stays unresolved. Not
        those of a root whose circuit breaker is open (they wait for the reload that
        closes it), nor while the store is down."""
        d = self.daemon
        if d.health.store_down is not None:
            return
        try:
            records, _ = d.store.with_status(UNRESOLVED, RETRY_UNRESOLVED_BATCH)
        except StoreError as exc:
            d.health.store_failed(exc)
            return
        now, base = time.monotonic(), d.config.unresolved_retry_seconds
        current = {rec.path for rec in records}
        self._retried = {p: v for p, v in self._retried.items() if p in current}
        for rec in sorted(records, key=lambda r: r.first_seen):
            watch = d.config.watch_for(rec.path)
            breaker = d.pipeline.breakers.get(watch.path) if watch is not None else None
            not_before, wait = self._retried.get(rec.path, (0.0, base / 2))
            if watch is None or (breaker is not None and breaker.open) or now < not_before:
                continue
            if not d.queue.put(Path(rec.path), background=True, arrival=rec.first_seen):
                return  # full: the next round (or the reconcile) takes the rest
            wait = min(2 * wait, RETRY_UNRESOLVED_MAX)
            self._retried[rec.path] = (now + wait - 1.0, wait)

    def file_moved(self, src: Path, dst: Path) -> None:
        old, new = self.daemon.config.watch_for(src), self.daemon.config.watch_for(dst)
        if old is None or new is None or old.scope != new.scope:
            self.file_deleted(src)
            self.file_ready(dst)
            return
        try:
            self.daemon.store.repath(new.scope, str(src), str(dst))
        except StoreError as exc:
            self._store_call_failed(exc, dst)
        self.file_ready(dst)  # a no-op if the record now matches the file

    def dir_moved(self, src: Path, dst: Path) -> None:
        new = self.daemon.config.watch_for(dst)
        try:
            if new is not None:
                self.daemon.store.repath_tree(new.scope, str(src), str(dst))
        except StoreError as exc:
            self._store_call_failed(exc, dst)
        self.daemon.scanner.request(dst, trigger="directory")

    def dir_arrived(self, path: Path) -> None:
        self.daemon.scanner.request(path, trigger="directory")

    def dir_deleted(self, path: Path) -> None:
        if path in self.daemon.roots.ids:  # IN_DELETE_SELF: a new directory may get its inode
            self.daemon.roots.lost(path)
        self.daemon.scanner.request(path, trigger="directory")

    def dir_moved_away(self, path: Path) -> None:
        """A directory moved to where no watch sees it: its files' records get the grace
        a file moved away gets (moved out and back, or into a directory not watched yet,
        they keep their records, an allowed one its restore); a root is lost."""
        d = self.daemon
        if path in d.roots.ids or d.config.watch_for(path) is None:
            self.dir_deleted(path)
            return
        try:
            paths = [Path(r.path) for r in d.store.iter_records(prefix=str(path))]
        except StoreError as exc:
            self._store_call_failed(exc, path)
            return
        self._defer_forget(paths)

    def overflow(self) -> None:
        roots = [w.path for w in self.daemon.config.watches]
        emit(Event.OVERFLOW_RESCAN, "inotify queue overflowed: events were lost; rescanning "
             f"{len(roots)} roots (raise fs.inotify.max_queued_events if this recurs)",
             roots=",".join(map(str, roots)))
        self.daemon.scanner.request(*roots, trigger="overflow")

    # ------------------------------------------------------------ workers

    def work(self) -> None:
        """A worker thread: paths from the queue along the pipeline, until the daemon
        stops; while the store is down, files wait in the queue (and the one each worker
        holds, in its hands: see _decide)."""
        me = threading.get_ident()
        d = self.daemon
        queue, health, stopping = d.queue, d.health, d.stopping
        while not stopping.is_set():
            if health.store_down is not None:  # files wait in the queue until it is back
                stopping.wait(0.5)
                continue
            path = queue.get(0.5)
            if path is None:
                continue
            d.metrics.arrived(queue.arrived(path))
            try:
                self._decide(path, me)
            finally:
                queue.done(path)
                if path not in queue:  # not waiting to be looked at again
                    self.closed.pop(path, None)

    def _decide(self, path: Path, me: int) -> None:
        """One path along the pipeline. A store failure keeps the file in this worker's
        hands until the store is back, then it is tried again: nothing was decided, or
        the decision is in the store already (process() starts by asking the store about
        the path). Held, not queued again: a later copy another worker hashed meanwhile
        waits for its turn behind it (keep: first), where a file back in the queue would
        let that copy be decided first, and then be replaced by it. A file the store
        keeps refusing while it answers otherwise (a path too long for its index, a
        record gone under it) is let go after FILE_STRIKES: the safety net retries it."""
        d, health = self.daemon, self.daemon.health
        delay, strikes = 0.05, 0
        while True:
            health.busy[me] = time.monotonic()
            answered = health.store_down is None  # the store answered since the last try
            try:
                self.process(path)
                return
            except RecordGone as exc:  # not an outage: a record vanished mid-decision
                failure: StoreError = exc
            except StoreError as exc:
                failure = exc
                health.store_failed(exc, path=str(path))
            except Exception:
                log.exception("processing %s failed; it stays where it is", path)
                d.scanner.reconciler.forget_mark(path.parent)  # the safety net retries it
                return
            finally:
                health.busy.pop(me, None)  # waiting for the store is not a wedged worker
            strikes += answered
            if strikes >= FILE_STRIKES:
                log.error("%s: the store refused it %d times while answering otherwise "
                          "(%s); left where it is, retried at the next rescan", path,
                          strikes, failure)
                d.scanner.reconciler.forget_mark(path.parent)
                return
            # Until the main loop's ping sees the store answer again (bounded back-off if
            # the failure was too short for it to notice).
            while health.store_down is not None and not d.stopping.is_set():
                d.stopping.wait(0.25)
            if d.stopping.wait(delay):
                return  # undecided and still where it was: the next start's scan decides it
            delay = min(2 * delay, 1.0)

    def process(self, path: Path) -> None:
        """One file from the queue, along the pipeline's one path."""
        self.daemon.pipeline.process(path, self)

    # ------------------------------------------------------------ the pipeline's intake

    def unreadable(self, directory: Path, exc: OSError) -> None:
        self.daemon.scanner.reconciler.unreadable_dir(directory, exc)

    def hashed(self, seconds: float) -> None:
        self.daemon.metrics.observe_hash(seconds)

    def turn(self, path: Path) -> tuple[float | None, float | None]:
        self.daemon.queue.wait_turn(path, TURN_SECONDS)
        self.closed.pop(path, None)
        return self.daemon.queue.arrival(path)

    def unfinished(self, path: Path, st: os.stat_result) -> bool:
        wait = self._final(path, st)
        if wait > 0:  # not provably finished: look again once it would be
            if not self.daemon.queue.put(path, wait + 0.05):
                self._queue_full(path)
            return True
        self.closed.pop(path, None)
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
        for unfinished_seconds without one (a writer may pause far longer than
        settle_seconds). Else seconds to wait."""
        changed = max(st.st_mtime, st.st_ctime)
        closed = self.closed.get(path)
        grace = self.daemon.config.settle_seconds if closed is not None and closed >= changed \
            else max(self.daemon.config.unfinished_seconds, self.daemon.config.settle_seconds)
        return max(0.0, changed + grace - time.time())

