"""inotify (through watchdog) turned into a few plain callbacks about image files.

A file is worth looking at once it is complete: closed after writing, or renamed into
a root (the drop-folder convention: write `name.tmp`, then rename). Creations and
modifications only start a settle timer, for writers that never close cleanly.
watchdog drops the kernel's queue-overflow event before handlers see it, so the
inotify reader is wrapped to report it: events were lost and the roots need a rescan.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from dedupd.selection import is_ignored

log = logging.getLogger("dedupd.watcher")
# watchdog warns on stderr (raw text, breaking JSON logs) when it re-adds a directory it
# could not watch; the start-up and arrival walks report unreadable directories instead.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

# The events the handler acts on. Naming them lets watchdog ask the kernel for just these:
# without the filter every open and read-only close in a root (dedupd's own reads of each
# new file among them) would travel through watchdog's threads only to be dropped.
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent,
          FileMovedEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent]

SYSCTL_HINT = ("raise the limit: sysctl fs.inotify.max_user_watches=524288 (persist it in "
               "/etc/sysctl.d/, deploy/install.sh writes one)")


class WatchError(Exception):
    """A root cannot be watched (missing, a limit reached); the message says what to do."""


class Sink(Protocol):
    """What the watcher reports. Called from the observer's thread: keep it quick."""

    def file_ready(self, path: Path) -> None: ...
    def file_changing(self, path: Path) -> None: ...
    def file_found(self, path: Path) -> None: ...
    def file_moved(self, src: Path, dst: Path) -> None: ...
    def file_deleted(self, path: Path) -> None: ...
    def file_moved_away(self, path: Path) -> None: ...
    def dir_arrived(self, path: Path) -> None: ...
    def dir_moved(self, src: Path, dst: Path) -> None: ...
    def dir_deleted(self, path: Path) -> None: ...
    def dir_moved_away(self, path: Path) -> None: ...
    def overflow(self) -> None: ...


@dataclass(frozen=True)
class Root:
    path: Path
    recursive: bool = True


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Root, sink: Sink, ignore: tuple[str, ...]) -> None:
        self.root, self.sink, self.ignore = root, sink, ignore

    def _inside(self, raw: str | bytes) -> Path | None:
        path = Path(os.fsdecode(raw))
        if is_ignored(path, self.root.path, self.ignore):
            return None
        return path

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # a bug here must not kill the observer thread
            log.exception("watcher: cannot handle %r", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        src = self._inside(event.src_path)
        if isinstance(event, FileMovedEvent):
            dst = self._inside(event.dest_path)
            if src is not None and dst is not None:
                self.sink.file_moved(src, dst)
            elif dst is not None:  # renamed from a temp name, or moved in from outside
                self.sink.file_ready(dst)
            elif src is not None and not event.dest_path:  # to where no watch sees it
                self.sink.file_moved_away(src)
            elif src is not None:  # renamed to an ignored name or moved out
                self.sink.file_deleted(src)
        elif isinstance(event, DirMovedEvent):
            dst = self._inside(event.dest_path)
            if src is not None and dst is not None:
                self.sink.dir_moved(src, dst)
            elif dst is not None:
                self.sink.dir_arrived(dst)
            elif src is not None and not event.dest_path:  # to where no watch sees it
                self.sink.dir_moved_away(src)
            elif src is not None:
                self.sink.dir_deleted(src)
        elif src is None:
            return
        elif isinstance(event, FileClosedEvent):
            self.sink.file_ready(src)
        elif isinstance(event, FileCreatedEvent) and event.is_synthetic:
            self.sink.file_found(src)  # listed in a directory that moved in
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self.sink.file_changing(src)
        elif isinstance(event, FileDeletedEvent):
            self.sink.file_deleted(src)
        elif isinstance(event, DirCreatedEvent):
            if not event.is_synthetic:
                self.sink.dir_arrived(src)  # files may land before its watch is armed
        elif isinstance(event, DirDeletedEvent):
            self.sink.dir_deleted(src)


def _newest_first_emitter() -> type | None:
    """watchdog's full emitter, pairing each IN_MOVED_TO with its IN_MOVED_FROM by
    searching the pending events from the newest end.

    The kernel queues the two halves of a rename back to back, but watchdog searches its
    queue from the oldest event. In a drop-folder burst (thousands of renames read before
    the emitter catches up) that is quadratic: 0.25 ms of GIL-holding Python per file
    at 2,000 files, stalling the hashing threads. None when this watchdog's internals
    differ (then the stock emitter, which is correct, only slower).
    """
    try:
        from watchdog.observers.inotify import InotifyFullEmitter, InotifyWatchGroup
        from watchdog.observers.inotify_move_event_grouper import (
            InotifyMoveEventGrouper,
            PathedInotifyEvent,
        )
    except ImportError:
        return None
    if not all(hasattr(InotifyMoveEventGrouper, name) for name in (
            "get_queued_moved_from_event", "_group_moved_to_event")):
        return None

    class Grouper(InotifyMoveEventGrouper):
        def _newest_moved_from(self, cookie: int, *, remove: bool) -> PathedInotifyEvent | None:
            queue = self._queue
            with queue._lock:
                items = queue._queue
                for i in range(len(items) - 1, -1, -1):
                    event = items[i][0]
                    if (isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from
                            and event.ev.cookie == cookie):
                        if remove:
                            del items[i]
                        return event
            return None

        def get_queued_moved_from_event(self, cookie):  # type: ignore[no-untyped-def]
            return self._newest_moved_from(cookie, remove=False)

        def _group_moved_to_event(self, to_event):  # type: ignore[no-untyped-def]
            from_event = self._newest_moved_from(to_event.ev.cookie, remove=True)
            return (from_event, to_event) if from_event is not None else to_event

    class WatchGroup(InotifyWatchGroup):
        def __post_init__(self) -> None:
            self._move_event_grouper = Grouper()
            super().__post_init__()

    class Emitter(InotifyFullEmitter):
        def on_thread_start(self) -> None:
            self._inotify = WatchGroup(
                self._inotify_fd, os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink)

    return Emitter


def _make_observer(on_overflow: Callable[[], None]) -> BaseObserver:
    """An inotify observer whose reader also tells us about IN_Q_OVERFLOW."""
    try:
        from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
        from watchdog.observers.inotify_c import InotifyFD
    except ImportError:  # older watchdog: the periodic reconciliation is the safety net
        from watchdog.observers import Observer

        return Observer()

    class _ReportingFD(InotifyFD):
        def handle_event(self, event):  # type: ignore[no-untyped-def]
            if event.is_queue_overflow:
                on_overflow()
            super().handle_event(event)

    class _Observer(InotifyObserver):
        def __init__(self) -> None:
            fd = _ReportingFD()
            fd.start()
            # Full events: a move from outside the roots arrives as a move with no source
            # (complete, process now), not as a creation (which waits for the settle timer).
            BaseObserver.__init__(self, _newest_first_emitter() or InotifyFullEmitter,
                                  timeout=1.0, inotify_fd=fd)
            self._inotify_fd = fd

    return _Observer()


class Watcher:
    """Watches a set of roots; `arm()` may be called again to change them (reload)."""

    def __init__(self, sink: Sink, ignore: tuple[str, ...]) -> None:
        self.sink, self.ignore = sink, ignore
        self._observer: BaseObserver | None = None

    def arm(self, roots: Iterable[Root]) -> None:
        """(Re)start watching exactly these roots; raises WatchError naming the fix."""
        self.stop()
        observer = _make_observer(self.sink.overflow)
        try:
            for root in roots:
                if not root.path.is_dir():
                    raise WatchError(f"{root.path}: not a directory (create it or fix the "
                                     "watch path)")
                observer.schedule(_Handler(root, self.sink, self.ignore), str(root.path),
                                  recursive=root.recursive, follow_symlink=False,
                                  event_filter=EVENTS)
            observer.start()
        except OSError as exc:
            observer.stop()
            if exc.errno == errno.ENOSPC:
                raise WatchError(f"inotify watch limit reached; {SYSCTL_HINT}") from None
            if exc.errno == errno.EMFILE:
                raise WatchError("inotify instance limit reached; raise "
                                 "fs.inotify.max_user_instances") from None
            raise WatchError(f"cannot watch: {exc.strerror or exc}") from None
        self._observer = observer

    def alive(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
