"""Reconciling roots with the store (real trees, real SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dedupd.config import Config, Policy, Watch
from dedupd.daemon import Daemon, WorkQueue
from dedupd.store import ImageRecord, open_store

RECIPE = "dhash:8:fast:area:v1"


# ---------------------------------------------------------------- Store.children


def rec(path: str, size: int = 1, mtime_ns: int = 1, status: str = "kept") -> ImageRecord:
    return ImageRecord(scope="s", path=path, recipe=RECIPE, hash=hash(path) & 0xFFFF,
                       digest=f"d-{path}", file_size=size, mtime_ns=mtime_ns, width=1,
                       height=1, status=status)


def test_children_reads_one_directory_and_names_its_subdirectories(store_url: str) -> None:
    store = open_store(store_url)
    try:
        paths = ["/r/a.jpg", "/r/b.jpg", "/r/b/x.jpg", "/r/b/y/z.jpg", "/r/b.c.jpg",
                 "/r/b-d/1.jpg", "/r/c.jpg", "/r0/no.jpg", "/r.jpg", "/r/d/1.jpg",
                 "/r/é/ü.jpg", "/r/é.jpg", "/r/%_.jpg"]
        paths += [f"/r/many/{i:04d}.jpg" for i in range(300)]
        paths += [f"/r/mixed/{i:03d}.jpg" for i in range(40)]
        paths += [f"/r/mixed/{i:03d}/x.jpg" for i in range(0, 40, 7)]
        store.insert_many([rec(p, size=len(p)) for p in paths])
        files, subdirs = store.children("/r")
        assert set(files) == {"a.jpg", "b.jpg", "b.c.jpg", "c.jpg", "é.jpg", "%_.jpg"}
        assert files["b.c.jpg"][:2] == (len("/r/b.c.jpg"), 1)
        assert files["a.jpg"][2] == store.get_by_path("/r/a.jpg").id
        assert files["a.jpg"][3] == "kept"
        assert sorted(subdirs) == sorted(["b", "b-d", "d", "é", "many", "mixed"])
        files, subdirs = store.children("/r/many/")
        assert len(files) == 300 and subdirs == []
        files, subdirs = store.children("/r/mixed")
        assert len(files) == 40 and sorted(subdirs) == [f"{i:03d}" for i in range(0, 40, 7)]
        assert store.children("/r/b") == ({"x.jpg": (len("/r/b/x.jpg"), 1, store.get_by_path(
            "/r/b/x.jpg").id, "kept")}, ["y"])
        assert store.children("/nowhere") == ({}, [])
    finally:
        store.close()


# ---------------------------------------------------------------- Daemon.reconcile


@pytest.fixture
def tree(tmp_path: Path):
    """A root with files the store knows, and a daemon (not started) over them."""
    root = tmp_path / "data"
    for rel in ("a.jpg", "b.jpg", "sub/c.jpg", "sub/deep/d.jpg", "gone/e.jpg",
                ".hidden/f.jpg", "g.txt", "h.jpg.tmp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    config = Config(source="test", index=str(tmp_path / "index.sqlite"),
                    quarantine_dir=tmp_path / "q", watches=(Watch(root),),
                    policies={"default": Policy("default")})
    daemon = Daemon(config)
    records = []
    for rel in ("a.jpg", "b.jpg", "sub/c.jpg", "sub/deep/d.jpg", "gone/e.jpg",
                ".hidden/f.jpg"):
        st = (root / rel).lstat()
        records.append(ImageRecord(scope=str(root), path=str(root / rel), recipe=RECIPE,
                                   hash=len(rel), digest=rel, file_size=st.st_size,
                                   mtime_ns=st.st_mtime_ns, width=1, height=1))
    daemon.store.insert_many(records)
    yield daemon, root
    daemon.store.close()


def reconcile(daemon: Daemon, top: Path, trigger: str = "start-up"
              ) -> tuple[dict[str, int], set[str]]:
    """daemon.reconcile with a worker that takes what it queues (and hashes nothing):
    (its counts, the paths queued, relative to the root)."""
    taken: set[str] = set()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            path = daemon.queue.get(0.05)
            if path is not None:
                taken.add(str(path.relative_to(daemon.config.watches[0].path)))
                daemon.queue.done(path)

    t = threading.Thread(target=worker)
    t.start()
    try:
        counts = daemon.reconcile(top, trigger)
        for background in (True, False):
            daemon.queue.wait_drained(background, stop)
    finally:
        stop.set()
        t.join()
    return counts, taken


def known(daemon: Daemon, root: Path) -> set[str]:
    return {str(Path(r.path).relative_to(root)) for r in daemon.store.iter_records()}


def test_nothing_to_do(tree) -> None:
    daemon, root = tree
    counts, queued = reconcile(daemon, root)
    assert (counts["seen"], counts["queued"], counts["forgotten"]) == (5, 0, 0)
    assert queued == set()


def test_new_changed_vanished_and_ignored(tree) -> None:
    daemon, root = tree
    (root / "new").mkdir()
    (root / "new" / "n.jpg").write_bytes(b"new")
    (root / "b.jpg").write_bytes(b"changed content")
    (root / "sub" / "deep" / "d.jpg").unlink()
    for p in (root / "gone").iterdir():  # a whole directory vanished
        p.unlink()
    (root / "gone").rmdir()
    (root / "sub" / "x.jpg~").write_bytes(b"editor backup")  # ignored by name
    counts, queued = reconcile(daemon, root)
    assert queued == {"new/n.jpg", "b.jpg"}
    assert (counts["queued"], counts["forgotten"]) == (2, 2)
    # Records of ignored files whose files exist stay, as before.
    assert known(daemon, root) == {"a.jpg", "b.jpg", "sub/c.jpg", ".hidden/f.jpg"}


def test_vanished_records_wait_for_the_queue_to_find_moves(tree) -> None:
    """A file moved while nobody watched is queued at its new path, and its record is
    only forgotten once the queue has drained: the pipeline moves it first."""
    daemon, root = tree
    os.rename(root / "a.jpg", root / "sub" / "a2.jpg")
    old = daemon.store.get_by_path(str(root / "a.jpg"))
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(daemon.reconcile(root)))
    t.start()
    path = daemon.queue.get(30)
    assert path == root / "sub" / "a2.jpg"
    assert t.is_alive()  # waits for the queued file before forgetting
    daemon.store.update(old.with_(path=str(path)))  # what the pipeline does for a move
    daemon.queue.done(path)
    t.join(30)
    assert (result["moved"], result["forgotten"]) == (1, 0)
    assert daemon.store.get(old.id).path == str(root / "sub" / "a2.jpg")


def test_a_deleted_directory_scan_forgets_its_records(tree) -> None:
    daemon, root = tree
    (root / "sub" / "deep" / "d.jpg").unlink()
    (root / "sub" / "deep").rmdir()
    counts, _ = reconcile(daemon, root / "sub" / "deep", "directory")
    assert counts["forgotten"] == 1
    assert "sub/deep/d.jpg" not in known(daemon, root)


def test_a_root_that_is_a_symlink_is_walked(tree, tmp_path: Path) -> None:
    daemon, root = tree
    link = tmp_path / "link"
    link.symlink_to(root)
    config = daemon.config
    daemon.config = Config(source="test", index=config.index,
                           quarantine_dir=config.quarantine_dir, watches=(Watch(link),),
                           policies=config.policies)
    counts, _ = reconcile(daemon, link)
    assert counts["seen"] == 5 and counts["forgotten"] == 0


def test_non_recursive_root_lists_only_its_own_files(tree) -> None:
    daemon, root = tree
    config = daemon.config
    daemon.config = Config(source="test", index=config.index,
                           quarantine_dir=config.quarantine_dir,
                           watches=(Watch(root, recursive=False),), policies=config.policies)
    (root / "sub" / "new.jpg").write_bytes(b"x")
    counts, queued = reconcile(daemon, root)
    assert counts["seen"] == 2 and queued == set()
    assert counts["forgotten"] == 0


def test_the_periodic_safety_net_lists_unchanged_directories_only(tree) -> None:
    daemon, root = tree
    old = 1_000_000_000 * 1_600_000_000  # directories must be older than the racy window
    for d in (root, root / "sub", root / "sub" / "deep", root / "gone"):
        os.utime(d, ns=(old, old))
    reconcile(daemon, root)  # a full comparison marks every directory
    # Changed in place (inotify's job while running): the directory's mtime says nothing.
    (root / "sub" / "c.jpg").write_bytes(b"rewritten")
    os.utime(root / "sub", ns=(old, old))
    (root / "sub" / "deep" / "new.jpg").write_bytes(b"new")  # a new name: mtime changes
    counts, queued = reconcile(daemon, root, "interval")
    assert queued == {"sub/deep/new.jpg"}
    assert counts["unchanged_dirs"] >= 2 and counts["seen"] == 6
    # A full reconcile (start-up, overflow) compares every file.
    counts, queued = reconcile(daemon, root, "overflow")
    assert queued == {"sub/c.jpg", "sub/deep/new.jpg"}


def test_memory_does_not_hold_queued_paths(tree) -> None:
    """The reconcile keeps no set of what it queued: with a queue of 2 it still walks
    every file, held back by the queue's bound while a worker drains it."""
    daemon, root = tree
    daemon.queue = WorkQueue(2)
    for i in range(50):
        (root / "sub" / f"n{i}.jpg").write_bytes(b"n")
    taken: list[Path] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            path = daemon.queue.get(0.1)
            if path is not None:
                taken.append(path)
                daemon.queue.done(path)

    t = threading.Thread(target=worker)
    t.start()
    counts = daemon.reconcile(root)
    daemon.queue.wait_drained(True, stop)
    stop.set()
    t.join()
    assert counts["queued"] == 50 and len(set(taken)) == 50


# ---------------------------------------------------------------- the real daemon


def test_a_full_queue_lists_one_directory_and_reconciles_say_what_they_did(
        tmp_path: Path) -> None:
    """A burst beyond queue_size into a subdirectory: every file is decided, and the
    rescan it causes covers that directory only, logged with its trigger and counts."""
    import json

    from conftest import photo, write_image
    from daemonproc import DaemonProcess, records, wait_for, write_config

    root, drop = tmp_path / "data", tmp_path / "data" / "drop"
    drop.mkdir(parents=True)
    write_image(root / "old.jpg", photo(1, 64, 48))
    staging = tmp_path / "staging"
    staging.mkdir()
    db = tmp_path / "state" / "index.sqlite"
    cfg = write_config(tmp_path / "dedupd.yaml", {
        "index": str(db), "quarantine_dir": str(tmp_path / "state" / "q"),
        "queue_size": 3, "workers": 1, "watches": [{"path": str(root)}],
        "policies": {"default": {"action": "log"}}})
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log", log_mode="json").start()
    try:
        wait_for(lambda: str(root / "old.jpg") in records(db), 30, "old.jpg indexed")
        names = [f"n{i:02d}.jpg" for i in range(40)]
        for i, name in enumerate(names):
            write_image(staging / name, photo(100 + i, 64, 48))
        for name in names:
            os.rename(staging / name, drop / name)
        wait_for(lambda: all(str(drop / n) in records(db) for n in names), 120,
                 "every file of the burst indexed")
        events = [json.loads(line) for line in daemon.log_since_start().splitlines()
                  if line.startswith("{")]
    finally:
        assert daemon.stop() == 0
    started = [e for e in events if e["event"] == "reconcile_started"]
    finished = [e for e in events if e["event"] == "reconcile_finished"]
    assert started[0]["trigger"] == "start-up" and started[0]["root"] == str(root)
    startup = finished[0]
    assert (startup["trigger"], startup["seen"], startup["queued"]) == ("start-up", 1, 1)
    assert startup["message_id"] == "e75bb7be1c714d1b9bd633db7b788c82"
    full = [e for e in started if e["trigger"] == "queue full"]
    assert full, "the refused events caused no rescan"
    assert {e["root"] for e in full} == {str(drop)}  # that directory, never the root


def test_status_shows_a_pending_reconcile_and_its_progress(tree) -> None:
    daemon, root = tree
    assert "(scanning)" not in daemon.status_line()
    daemon.request_scan(root, trigger="start-up")  # what READY's status must show
    assert "(scanning)" in daemon.status_line()
    daemon.scanner.requests[False].clear()
    reconcile(daemon, root)  # a full run: its count is the next one's 100%
    seen_during: list[str] = []
    children = daemon.store.children

    def spy(directory: str):  # type: ignore[no-untyped-def]
        seen_during.append(daemon.status_line())
        return children(directory)

    daemon.store.children = spy  # type: ignore[method-assign]
    reconcile(daemon, root)
    assert any(f"reconciling {root}: " in s and "% of the last count" in s
               for s in seen_during), seen_during
    assert "(scanning)" not in daemon.status_line()
