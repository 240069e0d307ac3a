"""Reconciliation: bring the store in line with the disk under a directory (new and
changed files queued, vanished ones forgotten, moved ones counted), at start, after a
reload or an overflow, for a directory that moved in, and as the periodic safety net.

Reconciler is a little over 200 lines: the walk of one directory, its shortcut for
unchanged directories and the forgetting of vanished records share the marks it keeps.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.events import Event, emit
from dedupd.selection import name_ignored, wanted_test
from dedupd.store.base import IN_ROOT_STATUSES, UNRESOLVED, Known

if TYPE_CHECKING:
    from dedupd.daemon.core import Daemon

log = logging.getLogger("dedupd.daemon")

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
# Files to queue, held and sorted by mtime before they go to the queue: a run's new files
# are decided oldest first across its directories, not directory by directory (a later
# copy in a directory walked first would be accepted, then replaced by its original
# found later: two decisions). Bounded: about 10 MB whatever the number of changes.
QUEUE_BATCH = 50_000


class Reconciler:
    """Walks directories against the store; remembers which ones it compared in full."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.progress: dict[Path, dict[str, int]] = {}  # roots being reconciled: counts
        self.last_seen: dict[Path, int] = {}  # files seen by a root's last full reconcile
        # Directories fully compared, whose mtime says nothing changed since: path ->
        # (inode, mtime_ns, files seen). The periodic safety net only lists these.
        self.dir_marks: dict[str, tuple[int, int, int]] = {}
        self._interval_runs: dict[Path, int] = {}
        # Directories reported unreadable, until a full comparison of one succeeds again.
        self._unreadable: set[str] = set()
        self.last_reconcile: float | None = None  # Unix time of the last finished root scan

    def run(self, top: Path, trigger: str = "start-up", *,
                  recursive: bool = True) -> dict[str, int]:
        """Bring the store in line with the disk under `top`: queue new or changed files
        (size or mtime differ), forget records whose files are gone, and count records
        whose files were found at a new path. Runs while watching, so nothing is missed.

        One pass, a directory at a time: one listing, one bulk store query for its
        children, filters on names; the files to decide are held up to QUEUE_BATCH and
        queued oldest first, so memory follows that bound and the largest directory,
        never the number of changed files (the queue's bound holds the walk back). The
        periodic
        safety net (trigger "interval") only lists directories whose mtime is unchanged
        since their last full comparison (no file was added, removed or renamed there;
        inotify reports writes in place while the daemon runs), except a rolling
        1/FULL_EVERY of them, so every directory is compared in full now and then."""
        counts = {"seen": 0, "queued": 0, "forgotten": 0, "moved": 0, "dirs": 0,
                  "unchanged_dirs": 0}
        if self.daemon.config.watch_for(top) is None:
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
            self.progress[top] = counts
        vanished: list[tuple[int, str]] = []  # (id, path) of records whose file is gone
        due: list[tuple[int, str, int]] = []  # (mtime_ns, path, size) of files to queue
        settle = self.daemon.config.settle_seconds if quiet else 0.0
        stack = [top]
        try:
            try:
                while stack and not self.daemon.stopping.is_set():
                    self._reconcile_dir(stack.pop(), counts, stack, vanished, due,
                                        live=live, recursive=recursive, run=run)
                    if len(due) >= QUEUE_BATCH:
                        self._queue(due, live=live, since=started, settle=settle)
                    if len(vanished) >= VANISHED_BATCH:
                        self._queue(due, live=live, since=started, settle=settle)
                        self._forget(vanished, counts, live)
                self._queue(due, live=live, since=started, settle=settle)
            finally:
                # Files held but not queued (a store error, a stop): their directories
                # are compared in full next time, not taken as "nothing changed".
                for _, path, _ in due:
                    self.dir_marks.pop(os.path.dirname(path), None)
            self._forget(vanished, counts, live)
            for rejection in self.daemon.store.rejections(str(top)):
                if not os.path.lexists(rejection.path):  # said once, until it changes
                    self.daemon.store.forget_rejection(rejection.path)
        finally:
            self.progress.pop(top, None)
        if self.daemon.stopping.is_set():
            return counts
        if any(w.path == top for w in self.daemon.config.watches):
            self.last_reconcile = time.time()
            if trigger != "interval":
                self.last_seen[top] = counts["seen"]
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

    def _queue(self, due: list[tuple[int, str, int]], *, live: bool, since: float,
               settle: float) -> None:
        """Queue the files held in `due`, oldest first (see QUEUE_BATCH). Empty files are
        queued `settle` seconds ahead: a directory that just appeared may hold files
        created but not yet written (their close event makes them due at once), while a
        directory moved in whole is complete."""
        queue = self.daemon.queue
        for mtime_ns, path, size in sorted(due):
            queue.put(Path(path), 0.0 if size else settle, block=True,
                      background=not live, arrival=mtime_ns / 1e9, since=since)
        due.clear()

    def _reconcile_dir(self, directory: Path, counts: dict[str, int], stack: list[Path],
                       vanished: list[tuple[int, str]], due: list[tuple[int, str, int]], *,
                       live: bool, recursive: bool, run: int) -> None:
        """Compare one directory with its records; push its subdirectories on `stack`,
        and the files to decide (new or changed) on `due`."""
        config = self.daemon.config
        watch = config.watch_for(directory)
        if watch is None:
            return
        name = str(directory)
        root = str(watch.path)
        if not watch.recursive and name != root:
            return
        below = recursive and watch.recursive
        opened = self._open(directory, name == root, vanished)
        if opened is None:
            return
        st, listing = opened
        counts["dirs"] += 1
        ignored = name_ignored(config.ignore)
        if run and name not in self._unreadable and self._unchanged(name, st, run, counts):
            if below:
                with listing:
                    stack.extend(Path(e.path) for e in listing if not ignored(e.name)
                                 and e.is_dir(follow_symlinks=False))
            return
        files, store_subdirs = self.daemon.store.children(name)
        wanted_path = wanted_test(config.policy_for(watch))
        known_reject = self.daemon.pipeline.actor.known_reject
        queue = self.daemon.queue
        prefix = name[len(root) + 1:] + "/" if name != root else ""
        walked: set[str] = set()
        seen = 0
        with listing:
            for n, entry in enumerate(listing):
                if not live and n % YIELD_EVERY == 0:
                    queue.yield_to_live(0.05)
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
                    self.unreadable_dir(directory, exc)
                    return
                known = files.pop(entry_name, None)
                if known is not None and known[0] == est.st_size and \
                        known[1] == est.st_mtime_ns and known[3] != UNRESOLVED:
                    continue  # unresolved duplicates are decided again
                if known is None and known_reject(Path(entry.path), est):
                    continue
                due.append((est.st_mtime_ns, entry.path, est.st_size))
                counts["queued"] += 1
        counts["seen"] += seen
        self._left_over(directory, files, store_subdirs if recursive else [], walked,
                        vanished)
        if name in self._unreadable:  # compared in full: readable (and searchable) again
            self._unreadable.discard(name)
            log.info("%s: readable again; its files are processed", directory)
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            self.dir_marks[name] = (st.st_ino, st.st_mtime_ns, seen)
        else:  # changed within the timestamps' granularity of now: compare again next time
            self.dir_marks.pop(name, None)

    def _open(self, directory: Path, is_root: bool, vanished: list[tuple[int, str]]
              ) -> tuple[os.stat_result, Iterator[os.DirEntry[str]]] | None:
        """The directory's stat and listing; None (its records handled) if it is gone,
        no longer a directory, or unreadable. A root may be a symlink to a directory."""
        name = str(directory)
        try:
            st = os.stat(name) if is_root else os.lstat(name)
            if not stat.S_ISDIR(st.st_mode):  # replaced by a file or a symlink
                self._vanished_under(directory, vanished, gone=False)
                return None
            return st, os.scandir(name)
        except FileNotFoundError:  # deleted: its records go
            self._vanished_under(directory, vanished, gone=True)
        except OSError as exc:  # unreadable: leave its records alone
            self.unreadable_dir(directory, exc)
        return None

    def _unchanged(self, name: str, st: os.stat_result, run: int,
                   counts: dict[str, int]) -> bool:
        """In a periodic run: unchanged since its last full comparison (same inode and
        mtime), and not among this run's rolling 1/FULL_EVERY compared in full anyway."""
        mark = self.dir_marks.get(name)
        if mark is None or mark[:2] != (st.st_ino, st.st_mtime_ns) or \
                zlib.crc32(os.fsencode(name)) % FULL_EVERY == run % FULL_EVERY:
            return False
        counts["unchanged_dirs"] += 1
        counts["seen"] += mark[2]
        return True

    def _left_over(self, directory: Path, files: dict[str, Known],
                   store_subdirs: Iterable[str], walked: set[str],
                   vanished: list[tuple[int, str]]) -> None:
        """Records the listing did not account for: files gone (present but not wanted
        ones are kept, as before), and subdirectories not walked."""
        name = str(directory)
        for entry_name, (_, _, rid, status) in files.items():
            path = os.path.join(name, entry_name)
            if status in IN_ROOT_STATUSES and not os.path.lexists(path):
                vanished.append((rid, path))
        for sub in store_subdirs:  # a shallow scan passes none
            if sub not in walked:
                self._vanished_under(directory / sub, vanished,
                                     gone=not os.path.lexists(os.path.join(name, sub)))

    def forget_mark(self, directory: Path) -> None:
        """Compare this directory in full next time (a file there failed)."""
        self.dir_marks.pop(str(directory), None)

    def _vanished_under(self, directory: Path, vanished: list[tuple[int, str]], *,
                        gone: bool) -> None:
        """Records below a directory the walk does not enter: all of them if it is gone,
        else those whose file is gone (an ignored or unwalked directory)."""
        if gone:
            name = str(directory)
            for key in [k for k in self.dir_marks if k == name or k.startswith(name + "/")]:
                del self.dir_marks[key]
        for rec in self.daemon.store.iter_records(prefix=str(directory)):
            if rec.status in IN_ROOT_STATUSES and (gone or not os.path.lexists(rec.path)):
                vanished.append((rec.id, rec.path))  # type: ignore[arg-type]

    def unreadable_dir(self, path: Path, exc: OSError) -> None:
        """One line per unreadable directory, once until a full comparison of it succeeds
        again (then one line saying so): locked, opened and locked again is said twice,
        never once per rescan. The walk goes on."""
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
            self.daemon.queue.wait_drained(True, self.daemon.stopping)
        if self.daemon.stopping.is_set():
            return
        forgotten, moved = self.daemon.store.prune_missing(
            vanished, lambda path: not os.path.lexists(path))
        counts["forgotten"] += forgotten
        counts["moved"] += moved
        vanished.clear()

