"""The watcher on real inotify: what reaches the daemon's callbacks for renames."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from dedupd.watcher import Root, Watcher, _newest_first_emitter


class Recorder:
    """A Sink that records every callback."""

    def __init__(self) -> None:
        self.moved: dict[Path, Path] = {}
        self.ready: list[Path] = []
        self.deleted: list[Path] = []
        self.moved_away: list[Path] = []
        self.cond = threading.Condition()

    def _note(self, kind: list[Path], path: Path) -> None:
        with self.cond:
            kind.append(path)
            self.cond.notify_all()

    def file_ready(self, path: Path) -> None:
        self._note(self.ready, path)

    def file_deleted(self, path: Path) -> None:
        self._note(self.deleted, path)

    def file_moved_away(self, path: Path) -> None:
        self._note(self.moved_away, path)

    def file_moved(self, src: Path, dst: Path) -> None:
        with self.cond:
            self.moved[src] = dst
            self.cond.notify_all()

    def file_changing(self, path: Path) -> None: ...
    def file_found(self, path: Path) -> None: ...
    def dir_arrived(self, path: Path) -> None: ...
    def dir_moved(self, src: Path, dst: Path) -> None: ...
    def dir_deleted(self, path: Path) -> None: ...
    def dir_moved_away(self, path: Path) -> None: ...
    def overflow(self) -> None: ...

    def wait(self, done: callable, timeout: float = 20.0) -> bool:  # type: ignore[valid-type]
        deadline = time.monotonic() + timeout
        with self.cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True


def test_this_watchdog_gets_the_newest_first_move_pairing() -> None:
    # If a watchdog upgrade changes the internals it relies on, the daemon still works
    # (stock emitter) but bursts get slow again: fail here so someone looks.
    assert _newest_first_emitter() is not None


def test_a_burst_of_renames_pairs_every_move(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    names = [f"img{i:04d}.jpg" for i in range(1500)]
    for name in names:
        (root / name).write_bytes(b"x")
    (root / "drop.tmp").write_bytes(b"y")
    sink = Recorder()
    watcher = Watcher(sink, ignore=("*.tmp",))
    watcher.arm([Root(root)])
    try:
        for name in names:  # within the root: every one must arrive as a move
            os.rename(root / name, root / "sub" / name)
        os.rename(root / "drop.tmp", root / "dropped.jpg")  # from an ignored name: ready
        assert sink.wait(lambda: len(sink.moved) == len(names) and sink.ready)
        assert sink.moved == {root / n: root / "sub" / n for n in names}
        assert sink.ready == [root / "dropped.jpg"]
        assert sink.deleted == []
    finally:
        watcher.stop()


def test_a_move_to_where_no_watch_sees_is_not_a_deletion(tmp_path: Path) -> None:
    """Moved out of the roots, the destination unknown: the file may be in a directory
    created just before and not watched yet, so its record must not go at once (it
    would be decided anew there). Deleted, or renamed to an ignored name: gone."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for name in ("away.jpg", "deleted.jpg", "hidden.jpg"):
        (root / name).write_bytes(b"x")
    sink = Recorder()
    watcher = Watcher(sink, ignore=("*.tmp",))
    watcher.arm([Root(root)])
    try:
        os.rename(root / "away.jpg", outside / "away.jpg")
        os.unlink(root / "deleted.jpg")
        os.rename(root / "hidden.jpg", root / "hidden.tmp")
        assert sink.wait(lambda: sink.moved_away and len(sink.deleted) == 2)
        assert sink.moved_away == [root / "away.jpg"]
        assert sorted(sink.deleted) == [root / "deleted.jpg", root / "hidden.jpg"]
    finally:
        watcher.stop()
