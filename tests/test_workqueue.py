"""The work queue on its own: two classes (live events before reconcile work), each
bounded, deduplicated, settle delays, one worker per path at a time, arrival order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dedupd.daemon import WorkQueue


def test_live_events_are_served_before_background_work() -> None:
    q = WorkQueue(100)
    for i in range(5):
        assert q.put(Path(f"/bg{i}"), background=True)
    q.put(Path("/live"))
    assert q.get(0) == Path("/live")
    assert [q.get(0) for _ in range(5)] == [Path(f"/bg{i}") for i in range(5)]
    assert q.get(0) is None


def test_a_settling_live_file_does_not_hold_back_background_work() -> None:
    q = WorkQueue(100)
    q.put(Path("/settling"), 60.0)
    q.put(Path("/bg"), background=True)
    assert q.get(0) == Path("/bg")
    assert q.get(0) is None  # the live file is not due yet


def test_background_work_never_takes_a_live_event_place() -> None:
    q = WorkQueue(3)
    for i in range(3):
        assert q.put(Path(f"/bg{i}"), background=True)
    assert not q.put(Path("/bg3"), background=True)  # its class is full
    for i in range(3):
        assert q.put(Path(f"/live{i}"))  # live events still have their own room
    assert not q.put(Path("/live3"))
    assert len(q) == 6


def test_a_blocked_scanner_resumes_when_background_room_frees() -> None:
    q = WorkQueue(1)
    q.put(Path("/bg0"), background=True)
    done = threading.Event()

    def scanner() -> None:
        q.put(Path("/bg1"), block=True, background=True)
        done.set()

    t = threading.Thread(target=scanner)
    t.start()
    assert q.put(Path("/live"))  # not blocked by the waiting scanner
    assert not done.wait(0.2)
    assert q.get(0) == Path("/live")
    assert not done.is_set()  # a live path taken frees no background room
    assert q.get(0) == Path("/bg0")
    assert done.wait(10)
    t.join()
    assert q.get(0) == Path("/bg1")


def test_a_live_event_promotes_a_waiting_background_path() -> None:
    q = WorkQueue(10)
    q.put(Path("/a"), background=True)
    q.put(Path("/b"), background=True)
    q.put(Path("/b"))  # the file was just written again
    assert (q.pending(False), q.pending(True)) == (1, 1)
    assert q.get(0) == Path("/b")
    q.put(Path("/a"), background=True)  # already waiting: nothing changes
    assert q.pending(True) == 1
    assert q.get(0) == Path("/a")
    assert q.pending(True) == 1  # in flight
    q.done(Path("/a"))
    assert q.pending(True) == 0


def test_background_work_leaves_a_worker_for_live_events() -> None:
    q = WorkQueue(10, background_slots=1)
    q.put(Path("/bg0"), background=True)
    q.put(Path("/bg1"), background=True)
    assert q.get(0) == Path("/bg0")
    assert q.get(0) is None  # the one background slot is taken
    q.put(Path("/live"))
    assert q.get(0) == Path("/live")
    q.done(Path("/bg0"))
    assert q.get(0) is None  # a live file is being decided: background work waits
    q.done(Path("/live"))
    assert q.get(0) == Path("/bg1")


def test_wait_drained_returns_once_the_class_is_done() -> None:
    q = WorkQueue(10)
    stop = threading.Event()
    q.put(Path("/bg"), background=True)
    q.put(Path("/live"), 60.0)  # another class: not waited for

    def worker() -> None:
        path = q.get(10)
        q.done(path)

    t = threading.Thread(target=worker)
    t.start()
    q.wait_drained(True, stop)
    t.join()
    assert q.pending(True) == 0 and q.pending(False) == 1


def test_discard_frees_room() -> None:
    q = WorkQueue(1)
    q.put(Path("/a"))
    assert not q.put(Path("/b"))
    q.discard(Path("/a"))
    assert q.put(Path("/b"))
    assert q.get(0) == Path("/b")


def test_a_path_due_again_while_in_a_worker_waits_for_its_done() -> None:
    """Two workers never hold one path (both would decide it, and log it twice)."""
    q = WorkQueue(10)
    q.put(Path("/a"))
    assert q.get(0) == Path("/a")
    q.put(Path("/a"))  # written again while being hashed
    assert Path("/a") in q
    assert q.get(0) is None  # held back, not handed to a second worker
    q.done(Path("/a"))
    assert q.get(0) == Path("/a")
    q.done(Path("/a"))
    assert Path("/a") not in q and len(q) == 0


def test_a_modification_postpones_and_a_close_makes_due_now() -> None:
    q = WorkQueue(10)
    q.put(Path("/a"), 60.0)
    assert q.get(0) is None
    q.put(Path("/a"))  # closed after writing: due at once
    assert q.get(0) == Path("/a")


def test_wait_turn_follows_arrival_not_hashing_speed() -> None:
    """keep: first: a file that arrived later waits while an earlier one is in a
    worker's hands, and goes on once that one is done (or at its timeout)."""
    q = WorkQueue(10)
    q.put(Path("/early"), arrival=100.0)
    q.put(Path("/late"), arrival=200.0)
    assert {q.get(0), q.get(0)} == {Path("/early"), Path("/late")}
    assert q.arrival(Path("/late"))[0] == 200.0
    waited = threading.Event()

    def late_worker() -> None:
        q.wait_turn(Path("/late"), 10)
        waited.set()

    t = threading.Thread(target=late_worker)
    t.start()
    assert not waited.wait(0.2)  # /early is still being hashed
    started = time.monotonic()
    q.wait_turn(Path("/early"), 10)  # nothing earlier: no wait
    assert time.monotonic() - started < 1
    q.done(Path("/early"))
    assert waited.wait(10)
    t.join()
    started = time.monotonic()
    q.put(Path("/newer"), arrival=300.0)
    q.get(0)
    q.wait_turn(Path("/newer"), 0.2)  # /late is still held: the timeout bounds the wait
    assert 0.15 < time.monotonic() - started < 5


def test_close_refuses_puts_and_wakes_getters() -> None:
    q = WorkQueue(10)
    got: list[Path | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(30)))
    t.start()
    q.close()
    t.join(10)
    assert not t.is_alive() and got == [None]
    assert not q.put(Path("/a"))


def test_a_scan_finding_an_older_mtime_moves_the_arrival_earlier() -> None:
    """A directory moved in whole: its files come with synthetic events first (in
    listing order), then the directory's scan with their mtimes; keep: first goes by
    the earlier of the two, so the file written first is decided first."""
    q = WorkQueue(10)
    q.put(Path("/copy"), 0.5)  # its synthetic event came first
    q.put(Path("/original"), 0.5)
    first_event = q.arrival(Path("/copy"))
    q.put(Path("/original"), arrival=1000.0)  # the scan: written long before
    q.put(Path("/copy"), arrival=1001.0)
    assert q.arrival(Path("/original"))[0] == 1000.0
    assert q.arrival(Path("/copy")) == (1001.0, first_event[1])  # still since its event
    q.put(Path("/copy"), arrival=5000.0)  # a later time never moves it back
    assert q.arrival(Path("/copy"))[0] == 1001.0


def test_of_the_files_due_the_earliest_arrival_goes_first() -> None:
    """keep: first: the files of a directory that moved in come in listing order, a
    later copy often first; once due, they are handed out by arrival (their mtimes),
    so the original is in a worker's hands before its copy and the copy waits its turn."""
    q = WorkQueue(10)
    q.put(Path("/a_copy"), arrival=2000.0)
    q.put(Path("/z_original"), arrival=1000.0)
    q.put(Path("/settling"), 60.0, arrival=10.0)  # earliest, but not due yet
    q.put(Path("/bg_old"), background=True, arrival=1.0)  # background waits for live
    assert [q.get(0), q.get(0)] == [Path("/z_original"), Path("/a_copy")]
    q.done(Path("/z_original"))
    q.done(Path("/a_copy"))
    assert q.get(0) == Path("/bg_old")
    assert q.get(0) is None
    q.put(Path("/settling"))  # closed: due now, and still first by arrival
    q.put(Path("/newer"), arrival=3000.0)
    assert q.get(0) == Path("/settling")


def test_live_due_ignores_files_still_settling() -> None:
    """What a moved-away file's forget waits for: live files due or in a worker, not a
    slow writer's file that settles for a minute."""
    q = WorkQueue(10)
    q.put(Path("/settling"), 60.0)
    q.put(Path("/bg"), background=True)
    assert not q.live_due()
    q.put(Path("/now"))
    assert q.live_due()
    assert q.get(0) == Path("/now")
    assert q.live_due()  # in a worker
    q.done(Path("/now"))
    assert not q.live_due()


def test_a_fallback_put_never_postpones_a_path_already_due() -> None:
    """A moved-in directory's scan queues its files due at once; the watcher's listing of
    it comes with a fallback delay, which must not push them back (a 60 s settle did)."""
    q = WorkQueue(10)
    q.put(Path("/d/deep.jpg"))  # the directory's scan
    q.put(Path("/d/deep.jpg"), 60.0, postpone=False)  # the watcher's synthetic event
    assert q.get(0) == Path("/d/deep.jpg")
