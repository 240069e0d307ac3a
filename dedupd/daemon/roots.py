"""The watched roots: arm their inotify watches, note which directory each one is, and
notice one deleted, moved away or replaced (then re-arm it once a directory is back)."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dedupd.config import Config
from dedupd.watcher import Root, WatchError

if TYPE_CHECKING:
    from dedupd.daemon.core import Daemon

log = logging.getLogger("dedupd.daemon")


class Roots:
    """Which directory each watched root is, as armed: (st_dev, st_ino), None if lost."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.ids: dict[Path, tuple[int, int] | None] = {}
        self._lock = threading.Lock()  # lost() runs on the watcher's thread

    def _of(self, config: Config | None = None) -> list[Root]:
        return [Root(w.path, w.recursive) for w in (config or self.daemon.config).watches]

    def arm(self, config: Config, *, present_only: bool = False) -> None:
        """Watch config's roots (only those that exist, if present_only) and note which
        directory each one is, to notice it being deleted or replaced."""
        roots = self._of(config)
        if present_only:
            roots = [r for r in roots if r.path.is_dir()]
        self.daemon.watcher.arm(roots)
        self.ids = {r.path: _dir_id(r.path) for r in self._of(config)}

    def check(self) -> None:
        """A watched root deleted, moved away or replaced takes its inotify watches with
        it (IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED): say so once, and once a directory
        is at the path again, re-arm the watches and rescan (main loop, every second)."""
        back = False
        for path in list(self.ids):
            now = _dir_id(path)
            with self._lock:  # lost() marks roots lost from the watcher thread
                armed = self.ids.get(path)
                if now == armed:
                    continue
                if now is not None:
                    self.ids[path] = now
            if now is None:
                self.lost(path)
                continue
            log.warning("%s: watched root is %s; watching it again and rescanning", path,
                        "back" if armed is None else "a new directory (replaced)")
            back = True
        if back:
            try:
                self.arm(self.daemon.config, present_only=True)
            except WatchError as exc:
                log.error("cannot re-arm the watches (retried): %s", exc)
                for path in self.ids:
                    self.ids[path] = None  # compare afresh at the next check
                return
            self.daemon.scanner.request(*(w.path for w in self.daemon.config.watches),
                                        trigger="root back")

    def lost(self, path: Path) -> None:
        """A watched root went away: say so once; check() re-arms it once back."""
        with self._lock:
            if self.ids.get(path) is None:
                return
            self.ids[path] = None
        log.warning("%s: watched root is gone (deleted or moved away); files there are "
                    "not watched until it is back", path)


def _dir_id(path: Path) -> tuple[int, int] | None:
    """Which directory is at path now (device, inode); None if none is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
