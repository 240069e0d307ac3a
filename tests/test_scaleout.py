"""Scale-out plumbing of the PostgreSQL store (issue #14) against real servers: what a
file costs in round trips must not cost correctness when the server goes away."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
from test_postgres import PrivateCluster, private_cluster  # noqa: F401  (fixture)
from test_store import RECIPE, rec

from dedupd.store import replica
from dedupd.store.postgres import PostgresStore


def test_connections_a_server_restart_killed_are_replaced_not_reported(
        private_cluster: PrivateCluster, tmp_path: Path) -> None:  # noqa: F811
    """Pooled connections are not checked as they are handed out (a round trip per
    call): after a restart every one of them is dead, and still neither the ping nor the
    next call fails, however many the pool held."""
    store = PostgresStore(private_cluster.url, attempts=3)
    try:
        store.insert(rec("/a/before.jpg", 0x1234))
        held = [store._pool.getconn() for _ in range(8)]  # the pool grows to 8
        for conn in held:
            store._pool.putconn(conn)
        private_cluster.stop("fast")
        private_cluster.start()
        store.ping()  # the server is back: not an outage
        assert store.get_by_path("/a/before.jpg").hash == 0x1234
        store.insert(rec("/a/after.jpg", 0x5678))
        assert store.get_by_path("/a/after.jpg") is not None
    finally:
        store.close()


def test_a_replica_read_on_several_connections_is_one_snapshot(pg_url: str) -> None:
    """The replica's slices are read on several connections at once, all in the first
    one's snapshot: a row committed while they connect is not in the replica but
    numbered after its watermark (the claim re-checks it and the tail brings it), so no
    row is both missed and believed seen."""
    writer = PostgresStore(pg_url, replicate=False)
    try:
        writer.insert_many([rec(f"/old/{i}", i * 0x9E3779B97F4A7C15 % 2**64)
                            for i in range(3000)])
        writer.warm("s", RECIPE)
        (coll,) = writer._query("SELECT id FROM collections")[0]
        late: list[int] = []
        lock = threading.Lock()

        def connect() -> psycopg.Connection:
            # Each helper connection opens after a row committed that the load's
            # snapshot predates.
            with lock:
                late.append(writer.insert(rec(f"/late/{len(late)}", 0xABC0 + len(late))).id)
            return psycopg.connect(pg_url, autocommit=True)

        with psycopg.connect(pg_url, autocommit=True) as conn:
            loaded = replica.load(conn, coll, connect)
        assert len(late) == replica._LOAD_CONNECTIONS > 1
        assert len(loaded.index) == 3000
        seqs = dict(writer._query("SELECT id, seq FROM images WHERE id = ANY(%s)", (late,)))
        for n, rid in enumerate(late):
            assert not loaded.index.has(rid, 0xABC0 + n)
            assert seqs[rid] > loaded.watermark
        old = writer._query("SELECT id, hash FROM images WHERE path LIKE '/old/%%'")
        assert all(loaded.index.has(rid, h % 2**64) for rid, h in old)
    finally:
        writer.close()


def test_a_report_waits_for_the_flush_and_a_claim_a_crash_took_is_lost(
        private_cluster: PrivateCluster) -> None:  # noqa: F811
    """Claims commit without waiting for the disk and their reports wait for a group
    flush. A server crash before that flush: a claim whose row survived is reported, one
    whose row is gone is `lost` (decided again), never reported."""
    store = PostgresStore(private_cluster.url)
    gate = threading.Event()
    run = store._flusher._run

    def gated(fn):  # the flusher cannot flush until the test says so
        gate.wait(60)
        return run(fn)

    store._flusher._run = gated
    said: list[str] = []
    lost: list[str] = []
    try:
        store.warm("s", RECIPE)
        paths = [f"/a/{i}.jpg" for i in range(20)]
        for n, path in enumerate(paths):
            r = rec(path, (n + 1) * 0x9E3779B97F4A7C15 % 2**64)
            assert store.claim(r, 4, store.lookup("s", RECIPE, r.hash, r.digest, 4)) == []
            store.settle(path, lambda p=path: said.append(p), lambda p=path: lost.append(p))
        assert said == lost == []  # nothing said before a flush
        with psycopg.connect(private_cluster.url, autocommit=True) as conn:
            conn.execute("DELETE FROM images WHERE path = '/a/7.jpg'")  # surely lost
        private_cluster.stop("immediate")  # and any whose commit was not written yet
        private_cluster.start()
        gate.set()
        store.drain()
        there = {r.path for r in (store.get_by_path(p) for p in paths) if r is not None}
        assert "/a/7.jpg" in lost
        assert sorted(said) == sorted(there) and sorted(lost) == sorted(set(paths) - there)
    finally:
        gate.set()
        store.close()


def test_reports_of_claims_are_said_before_close_returns(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    said: list[str] = []
    try:
        store.warm("s", RECIPE)
        for i in range(50):
            r = rec(f"/b/{i}", (i + 7) * 0x9E3779B97F4A7C15 % 2**64)
            assert store.claim(r, 4, store.lookup("s", RECIPE, r.hash, r.digest, 4)) == []
            store.settle(r.path, lambda p=r.path: said.append(p), lambda: None)
    finally:
        store.close()
    assert len(said) == 50
