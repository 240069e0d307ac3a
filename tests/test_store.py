"""The store contract on every backend (store_url: SQLite and PostgreSQL), plus the embedded
SQLite store's own persistence, migrations and crash survival."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dedupd.store import ImageRecord, QuarantineEntry, StoreError, open_store
from dedupd.store.base import ALLOWED, DONE, QUARANTINED
from dedupd.store.sqlite import SCHEMA_VERSION

RECIPE = "dhash:8:fast:area:v1"


def rec(path: str, h: int, scope: str = "s", digest: str | None = None, **kw) -> ImageRecord:
    return ImageRecord(scope=scope, path=path, recipe=RECIPE, hash=h,
                       digest=digest or f"d-{path}", file_size=1, mtime_ns=1, width=10,
                       height=10, **kw)


def test_persists_and_migrates(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite"
    store = open_store(str(db))
    inserted = store.insert(rec("/a", 0xFFFF_0000_FFFF_0000))
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store = open_store(f"sqlite://{db}")
    assert store.get_by_path("/a") == inserted
    assert store.get(inserted.id).hash == 0xFFFF_0000_FFFF_0000
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite"
    open_store(str(db)).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(str(db))


def test_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        open_store(str(db))


def test_find_matches_scope_recipe_status_and_order(store_url: str) -> None:
    store = open_store(store_url)
    base = 0x0123_4567_89AB_CDEF
    a = store.insert(rec("/a", base ^ 0b111))  # distance 3
    b = store.insert(rec("/b", base ^ 0b1))  # distance 1
    store.insert(rec("/c", base, scope="other"))  # other scope: never
    store.insert(rec("/d", base).with_(recipe="dhash-seed:8:full:linear:v1"))  # other recipe
    q = store.insert(rec("/q", base, status=QUARANTINED))  # not live
    same = store.insert(rec("/same", base, digest="D"))  # same bytes (so the same hash)
    got = store.find_matches("s", RECIPE, base, "D", max_distance=4)
    assert [(m.record.path, m.distance, m.identical) for m in got] == [
        ("/same", 0, True), ("/b", 1, False), ("/a", 3, False)]
    assert [(m.record.path, m.identical) for m in store.find_matches("s", RECIPE, base, None,
                                                                     0)] == [("/same", False)]
    # Status changes keep the in-memory index in step.
    store.update(q.with_(status=ALLOWED))
    assert store.find_matches("s", RECIPE, base, None, 0)[0].record.path == "/q"
    store.update(b.with_(path="/b2"))
    assert store.find_matches("s", RECIPE, base, None, 1)[-1].record.path == "/b2"
    store.delete(a.id)
    assert [m.record.path for m in store.find_matches("s", RECIPE, base, None, 4)] == [
        "/q", "/same", "/b2"]
    assert same.id and store.stats().images == 5
    store.close()


def test_identical_copy_is_found_among_many_equal_hashes(store_url: str) -> None:
    store = open_store(store_url)
    store.insert_many([rec(f"/flat{i}", 0) for i in range(1200)])  # flat images: hash 0
    store.insert(rec("/copy", 0, digest="D"))
    got = store.find_matches("s", RECIPE, 0, "D", max_distance=0, limit=2)
    assert [(m.record.path, m.identical) for m in got] == [("/copy", True), ("/flat0", False)]
    store.close()


def test_queries_equal_brute_force(store_url: str) -> None:
    rnd = random.Random(7)
    store = open_store(store_url)
    values = [rnd.getrandbits(64) for _ in range(3000)]
    values += [v ^ (1 << rnd.randrange(64)) for v in values[:300]]
    store.insert_many([rec(f"/{i}", v) for i, v in enumerate(values)])
    for q in values[:50] + [rnd.getrandbits(64) for _ in range(20)]:
        for d in (0, 2, 6, 12):
            want = sorted(((v ^ q).bit_count(), i) for i, v in enumerate(values)
                          if (v ^ q).bit_count() <= d)[:10]
            got = [(m.distance, int(m.record.path[1:]))
                   for m in store.find_matches("s", RECIPE, q, None, d, limit=10)]
            assert got == want
    store.close()


def test_prefix_listing_is_literal(store_url: str) -> None:
    store = open_store(store_url)
    for p in ("/d/a.jpg", "/d/sub/b.jpg", "/d_x/c.jpg", "/d%/e.jpg", "/dd/f.jpg"):
        store.insert(rec(p, 1))
    assert [r.path for r in store.iter_records(prefix="/d")] == ["/d/a.jpg", "/d/sub/b.jpg"]
    store.close()


def test_listing_pages_through_and_survives_deletes(tmp_path: Path, monkeypatch) -> None:
    import dedupd.store.sqlite as backend

    monkeypatch.setattr(backend, "ITER_PAGE", 3)
    store = open_store(str(tmp_path / "i.sqlite"))
    store.insert_many([rec(f"/r/{i:02d}.jpg", i, scope="a" if i % 2 else "b")
                       for i in range(20)] + [rec("/s/x.jpg", 1)])
    seen = []
    for r in store.iter_records(prefix="/r"):
        seen.append(r.path)
        if r.hash % 3 == 0:
            store.delete(r.id)  # what reconciliation does while it walks
    assert seen == [f"/r/{i:02d}.jpg" for i in range(20)]
    assert [r.path for r in store.iter_records(scope="a")] == [
        f"/r/{i:02d}.jpg" for i in range(20) if i % 2 and i % 3]
    assert len(list(store.iter_records())) == 20 - 7 + 1
    store.close()


def test_quarantine_journal(store_url: str) -> None:
    store = open_store(store_url)
    e = store.add_quarantine(QuarantineEntry("/a", "/q/a", "/b", 2, "00ff", "default"))
    assert e.id and store.list_quarantine(("pending",)) == [e]
    done = QuarantineEntry(**{**e.__dict__, "state": DONE})
    store.update_quarantine(done)
    assert store.get_quarantine(e.id) == done and store.list_quarantine(("pending",)) == []
    store.close()


def test_sigkill_mid_batch_keeps_committed_rows(tmp_path: Path) -> None:
    """A writer killed mid-stream: every committed batch survives, the file opens cleanly."""
    db = tmp_path / "i.sqlite"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import itertools
        from pathlib import Path
        from dedupd.store import ImageRecord, open_store
        s = open_store({str(db)!r})
        for batch in itertools.count():
            s.insert_many([ImageRecord("s", f"/{{batch}}/{{i}}", {RECIPE!r}, batch * 1000 + i,
                                       "d", 1, 1, 1, 1) for i in range(100)])
            if batch == 20:
                Path({str(ready)!r}).write_text("go")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script],
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        import time

        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    store = open_store(str(db))
    n = store.stats().images
    assert n >= 2100 and n % 100 == 0  # whole transactions only
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


def _live_truth(path: Path) -> list[tuple[int, int]]:
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT id, hash FROM images WHERE status IN ('kept', 'allowed') "
                        "ORDER BY id").fetchall()
    conn.close()
    return [(i, int.from_bytes(h, "little")) for i, h in rows]


def _index_contents(store, *, from_snapshot: bool | None = None) -> list[tuple[int, int]]:
    """What the in-memory index holds; from_snapshot: load it that way, or fail."""
    index = store._index("s", RECIPE)
    if from_snapshot is not None:
        index = store._load_snapshot("s", RECIPE)
        assert (index is not None) is from_snapshot
        if index is None:
            return []
    ids, hashes = index.export()
    return sorted(zip(ids.tolist(), hashes[:, 0].tolist(), strict=True))


def test_index_snapshot_catches_up_after_an_unclean_stop(tmp_path: Path, monkeypatch) -> None:
    import dedupd.store.sqlite_index as indexes

    monkeypatch.setattr(indexes, "SNAPSHOT_MIN", 0)
    db = tmp_path / "i.sqlite"
    rnd = random.Random(5)
    store = open_store(str(db))
    ids = store.insert_many([rec(f"/{i}", rnd.getrandbits(64)) for i in range(2000)])
    assert ids == list(range(1, 2001))
    records = [store.get(i) for i in ids]
    store.warm("s", RECIPE)
    store.close()  # clean stop: snapshot written, log trimmed
    snapshots = list(tmp_path.glob("i.sqlite.hamming-*.npz"))
    assert len(snapshots) == 1

    store = open_store(str(db))
    assert _index_contents(store, from_snapshot=True) == _live_truth(db)
    store.insert_many([rec(f"/new{i}", rnd.getrandbits(64)) for i in range(300)])
    for r in records[:100]:
        store.update(r.with_(status=QUARANTINED))
    for r in records[100:150]:
        store.delete(r.id)
    for r in records[150:200]:
        store.update(r.with_(hash=rnd.getrandbits(64)))
    store.delete(store.get_by_path("/new299").id)  # the largest id: SQLite may reuse it
    store.insert(rec("/reused", 42))
    store._db.close()  # killed: no checkpoint, the snapshot is stale

    store = open_store(str(db))
    assert _index_contents(store, from_snapshot=True) == _live_truth(db)
    assert _index_contents(store) == _live_truth(db)
    assert store.find_matches("s", RECIPE, 42, None, 0)[0].record.path == "/reused"
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM index_log").fetchone()[0] == 0
    conn.close()

    snapshots[0].write_bytes(b"garbage")  # a damaged snapshot is ignored, not trusted
    store = open_store(str(db))
    assert _index_contents(store, from_snapshot=False) == []
    assert _index_contents(store) == _live_truth(db)
    store._db.close()


BYTE_PATHS = [os.fsdecode(p) for p in (b"/d/bad\xff.jpg", b"/d/back\\slash\\xff.jpg",
                                        b"/d/new\nline.jpg", b"/d/\xe9t\xe9.jpg",
                                        b"/d\xff/x.jpg", "/d/ünï.jpg".encode())]


def test_any_bytes_the_kernel_allows_are_a_path(store_url: str) -> None:
    """#12-6: non-UTF-8 names (surrogate-escaped) and backslashes round-trip exactly,
    in records, lookups, prefix listings and the quarantine journal."""
    store = open_store(store_url)
    try:
        store.insert_many([rec(p, i, digest=f"d{i}") for i, p in enumerate(BYTE_PATHS)])
        for p in BYTE_PATHS:
            assert store.get_by_path(p).path == p
        assert store.existing_paths(BYTE_PATHS + ["/d/other"]) == set(BYTE_PATHS)
        under = sorted(r.path for r in store.iter_records(prefix="/d"))
        assert under == sorted(p for p in BYTE_PATHS if p.startswith("/d/"))
        moved = store.get_by_path(BYTE_PATHS[0]).with_(path=BYTE_PATHS[0] + "\udcfe")
        store.update(moved)
        assert store.get_by_path(BYTE_PATHS[0] + "\udcfe").id == moved.id
        e = store.add_quarantine(QuarantineEntry(BYTE_PATHS[1], BYTE_PATHS[2], BYTE_PATHS[4],
                                                 0, "00", "p"))
        assert store.get_quarantine(e.id) == e and store.list_quarantine() == [e]
    finally:
        store.close()


def test_rejections_are_remembered(store_url: str) -> None:
    """#12-19: a rejected file's path, size, mtime and reason persist (on disk, not in a
    set that is wiped when it grows), per path, until forgotten."""
    from dedupd.store.base import Rejection

    store = open_store(store_url)
    try:
        r = Rejection(BYTE_PATHS[0], 10, 20, "corrupt", "bad marker")
        store.put_rejection(r)
        store.put_rejection(Rejection("/e/x.jpg", 1, 2, "empty", "zero bytes"))
        assert store.get_rejection(BYTE_PATHS[0]) == r
        newer = Rejection(BYTE_PATHS[0], 11, 21, "truncated", "no EOI")
        store.put_rejection(newer)
        assert store.get_rejection(BYTE_PATHS[0]) == newer
        assert store.rejections("/d") == [newer]
        store.forget_rejection(BYTE_PATHS[0])
        assert store.get_rejection(BYTE_PATHS[0]) is None and store.rejections("/d") == []
    finally:
        store.close()
    again = open_store(store_url)
    assert again.get_rejection("/e/x.jpg").reason == "zero bytes"
    again.close()


def test_path_state_answers_record_and_rejection_in_one_read(store_url: str) -> None:
    """A new file's first question (#14: one round trip, not two, to a shared store)
    gives what get_by_path and get_rejection give, for any bytes a name may hold."""
    from dedupd.store.base import Rejection

    store = open_store(store_url)
    try:
        kept, rejected, both, neither = BYTE_PATHS[:4]
        store.insert_many([rec(kept, 1, digest="d1"), rec(both, 2, digest="d2")])
        for p in (rejected, both):
            store.put_rejection(Rejection(p, 1, 2, "corrupt", "bad"))
        for p in (kept, rejected, both, neither, "/nowhere/x.jpg"):
            record, is_rejected = store.path_state(p)
            assert record == store.get_by_path(p), p
            assert is_rejected == (store.get_rejection(p) is not None), p
        assert store.path_state(kept)[0].path == kept and store.path_state(rejected)[1]
    finally:
        store.close()


def _made_by_an_older_dedupd(db: Path, version: int) -> sqlite3.Connection:
    """A connection to a new store file at schema `version` (its first migrations)."""
    import dedupd.store.sqlite as backend

    conn = sqlite3.connect(db)
    for script in backend.MIGRATIONS[:version]:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {version}")
    return conn


def test_migration_keeps_paths_with_backslashes(tmp_path: Path) -> None:
    """A version-3 file whose paths hold backslashes reads back the same after the
    path encoding (which doubles them) is introduced."""
    db = tmp_path / "i.sqlite"
    conn = _made_by_an_older_dedupd(db, 3)
    conn.execute("INSERT INTO images VALUES (1, 's', ?, ?, ?, 'd', 1, 1, 1, 1, 0, 'kept')",
                 ("/d/a\\b.jpg", RECIPE, (5).to_bytes(8, "little")))
    conn.execute("INSERT INTO quarantine VALUES (1, 1, '/d/x\\y', '/q/x\\y', '/m', 0, '00', "
                 "'p', 'duplicate', 0, 'done')")
    conn.commit()
    conn.close()
    store = open_store(str(db))
    try:
        assert store.migrated == (3, SCHEMA_VERSION)
        assert store.get_by_path("/d/a\\b.jpg").id == 1
        e = store.get_quarantine(1)
        assert (e.original_path, e.quarantine_path) == ("/d/x\\y", "/q/x\\y")
    finally:
        store.close()


def _lock_is_held(store, scope: str, takers: list) -> bool:
    """Whether another thread finds `scope` locked right now (it waits briefly; the
    thread, added to `takers` to be joined, takes the lock once the holder lets go)."""
    import threading

    got = threading.Event()

    def take() -> None:
        with store.locked(scope):
            got.set()

    takers.append(threading.Thread(target=take, daemon=True))
    takers[-1].start()
    return not got.wait(0.3)


def _joined(takers: list) -> bool:
    for t in takers:
        t.join(10)
    return not any(t.is_alive() for t in takers)


def test_forget_deletes_only_a_gone_file_under_the_lock(store_url: str) -> None:
    store = open_store(store_url)
    try:
        kept = store.insert(rec("/d/a.jpg", 1))
        store.insert(rec("/d/q.jpg", 2, status=QUARANTINED))
        held, takers = [], []
        assert store.forget("s", "/d/a.jpg", lambda: False) is None  # the file is back
        assert store.get(kept.id) == kept
        assert store.forget("s", "/d/q.jpg", lambda: True) is None  # not in a root
        assert store.get_by_path("/d/q.jpg") is not None
        assert store.forget("s", "/d/none.jpg", lambda: True) is None
        gone = store.forget("s", "/d/a.jpg", lambda: held.append(_lock_is_held(store, "s", takers))
                            or True)
        assert gone == kept and store.get_by_path("/d/a.jpg") is None
        assert held == [True]  # gone() was asked under the scope's lock
        assert _joined(takers)  # ... and the lock was let go
    finally:
        store.close()


def test_repath_moves_a_record_and_replaces_the_targets(store_url: str) -> None:
    """`mv a b` over an indexed b: b's record goes with its file, a's moves to b (the
    newcomer trial: a's stale record made a later copy of a "moved", and kept)."""
    store = open_store(store_url)
    try:
        a = store.insert(rec("/d/a.jpg", 1))
        b = store.insert(rec("/d/b.jpg", 2))
        assert store.repath("s", "/d/a.jpg", "/d/b.jpg") == a.with_(path="/d/b.jpg")
        assert store.get(b.id) is None and store.get_by_path("/d/b.jpg") == \
            a.with_(path="/d/b.jpg")
        assert store.get_by_path("/d/a.jpg") is None
        store.repath("s", "/d/b.jpg", "/d/a.jpg")  # and back
        moved = store.repath("s", "/d/a.jpg", "/e/a.jpg")
        assert moved == a.with_(path="/e/a.jpg") == store.get_by_path("/e/a.jpg")
        assert store.get_by_path("/d/a.jpg") is None
        assert store.repath("s", "/d/a.jpg", "/f/a.jpg") is None  # nothing there any more
        # The in-memory index follows the move.
        assert [m.record.path for m in store.find_matches("s", RECIPE, 1, None, 0)] == [
            "/e/a.jpg"]
    finally:
        store.close()


def test_repath_tree_moves_a_directory_of_one_scope(store_url: str) -> None:
    store = open_store(store_url)
    try:
        store.insert_many([rec("/d/a.jpg", 1), rec("/d/sub/b.jpg", 2),
                           rec("/d/q.jpg", 3, status=QUARANTINED),
                           rec("/d/o.jpg", 4, scope="other"), rec("/d_x/c.jpg", 5),
                           rec("/d/taken.jpg", 6), rec("/e/taken.jpg", 7)])
        assert store.repath_tree("s", "/d", "/e") == 2
        paths = {r.path: (r.scope, r.status) for r in store.iter_records()}
        assert paths == {"/e/a.jpg": ("s", "kept"), "/e/sub/b.jpg": ("s", "kept"),
                         "/d/q.jpg": ("s", QUARANTINED), "/d/o.jpg": ("other", "kept"),
                         "/d_x/c.jpg": ("s", "kept"), "/d/taken.jpg": ("s", "kept"),
                         "/e/taken.jpg": ("s", "kept")}
    finally:
        store.close()


def test_prune_missing_forgets_gone_files_and_counts_moves(store_url: str) -> None:
    store = open_store(store_url)
    try:
        a, b, c = (store.insert(rec(f"/d/{n}.jpg", i)) for i, n in enumerate("abc"))
        store.update(b.with_(path="/d/b2.jpg"))  # found under a new name meanwhile
        held, takers = [], []

        def gone(path: str) -> bool:
            held.append(_lock_is_held(store, "s", takers))
            return path != "/d/c.jpg"  # c is back

        vanished = [(a.id, a.path), (b.id, b.path), (c.id, c.path), (9999, "/d/none.jpg")]
        assert store.prune_missing(vanished, gone) == (1, 1)
        assert store.get(a.id) is None and store.get(b.id) and store.get(c.id)
        assert held == [True, True] and _joined(takers)
    finally:
        store.close()


def test_url_schemes_are_known_in_one_place(tmp_path: Path, monkeypatch) -> None:
    from dedupd.store import backend_of, sqlite_file

    monkeypatch.chdir(tmp_path)  # where a relative "mysql:/..." file would appear
    assert backend_of("/x/i.sqlite") == backend_of("sqlite:///x/i.sqlite") == "sqlite"
    assert backend_of("postgres://h/db") == backend_of("postgresql://u@h/db") == "postgresql"
    assert sqlite_file("sqlite:///x/i.sqlite") == "/x/i.sqlite"
    assert sqlite_file("postgresql://u@h/db") is None
    with pytest.raises(StoreError, match="unsupported store 'mysql'"):
        open_store("mysql://h/db")
    assert not list(tmp_path.iterdir())  # nothing was created for it


def test_a_missing_store_is_not_created_when_told_not_to(tmp_path: Path) -> None:
    from dedupd.store import StoreMissing

    with pytest.raises(StoreMissing, match="no such index"):
        open_store(str(tmp_path / "i.sqlite"), create=False)
    assert not list(tmp_path.iterdir())
    open_store(str(tmp_path / "i.sqlite")).close()
    stats = open_store(str(tmp_path / "i.sqlite"), create=False).stats()
    assert (stats.backend, stats.images, stats.by_status) == ("sqlite", 0, {})


def test_journal_keeps_how_a_file_matched(store_url: str) -> None:
    """#17: the transform that made a file match and its low-information flag are kept
    with its journal entry (the review shows them); entries without them read back
    as none and false."""
    store = open_store(store_url)
    try:
        turned = store.add_quarantine(QuarantineEntry("/a", "/q/a", "/b", 3, "00", "p",
                                                      transform="rot90",
                                                      low_information=True))
        plain = store.add_quarantine(QuarantineEntry("/c", "/q/c", "/b", 0, "00", "p"))
        assert store.get_quarantine(turned.id) == turned
        assert (turned.transform, turned.low_information) == ("rot90", True)
        got = store.get_quarantine(plain.id)
        assert (got.transform, got.low_information) == (None, False)
        store.update_quarantine(QuarantineEntry(**{**turned.__dict__, "state": DONE}))
        assert store.list_quarantine((DONE,))[0].transform == "rot90"
    finally:
        store.close()


def test_unresolved_records_are_counted_from_their_own_index(store_url: str) -> None:
    """#17: the pending gauge (with_status of unresolved records) reads an index of
    those records only, not every row."""
    from dedupd.store.base import UNRESOLVED

    store = open_store(store_url)
    try:
        store.insert_many([rec(f"/k{i}", i) for i in range(50)]
                          + [rec(f"/u{i}", i, status=UNRESOLVED) for i in range(3)])
        records, total = store.with_status(UNRESOLVED, 2)
        assert total == 3 and [r.path for r in records] == ["/u2", "/u1"]
        with pytest.raises(ValueError):
            store.with_status("kept' OR 1=1 --", 1)
    finally:
        store.close()
    if store_url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("SET enable_seqscan = off")  # a 53-row table: a scan is cheaper
            plan = [r[0] for r in conn.execute(
                "EXPLAIN SELECT count(*) FROM images WHERE status = 'unresolved'")]
    else:
        conn = sqlite3.connect(store_url)
        plan = [r[-1] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM images WHERE status = 'unresolved'")]
        conn.close()
    assert any("images_unresolved" in line for line in plan), plan


def test_migration_to_6_keeps_journal_entries(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite"
    conn = _made_by_an_older_dedupd(db, 5)
    conn.execute("INSERT INTO quarantine VALUES (1, 1, '/d/x', '/q/x', '/m', 2, '00', "
                 "'p', 'duplicate', 0, 'done')")
    conn.commit()
    conn.close()
    store = open_store(str(db))
    try:
        assert store.migrated == (5, SCHEMA_VERSION)
        e = store.get_quarantine(1)
        assert (e.original_path, e.distance, e.transform, e.low_information) == (
            "/d/x", 2, None, False)
    finally:
        store.close()


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    """#15: while one thread is inside a write transaction (a background worker's
    insert, a reconcile's delete), another thread's lookups and listings are served
    (WAL readers), seeing what was committed; the writer's own reads see its rows."""
    import threading

    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        a = store.insert(rec("/d/a.jpg", 1))
        store.warm("s", RECIPE)
        inside, release, seen = threading.Event(), threading.Event(), []

        def writer() -> None:
            with store._tx() as db:
                db.execute("DELETE FROM images WHERE id = ?", (a.id,))
                seen.append(store.get(a.id))  # its own uncommitted delete
                inside.set()
                release.wait(30)

        t = threading.Thread(target=writer)
        t.start()
        try:
            assert inside.wait(10)
            done = threading.Event()
            got = []

            def reader() -> None:
                got.append((store.get(a.id), [r.path for r in store.iter_records()],
                            store.children("/d")[0].keys(),
                            [m.record for m in store.find_matches("s", RECIPE, 1, None, 0)]))
                done.set()

            threading.Thread(target=reader, daemon=True).start()
            assert done.wait(5), "a read waited for the writer"
            assert got[0][0] == a and got[0][1] == ["/d/a.jpg"] and list(got[0][2]) == [
                "a.jpg"] and got[0][3] == [a]
        finally:
            release.set()
            t.join(10)
        assert seen == [None] and store.get(a.id) is None  # committed: gone for all
    finally:
        store.close()
