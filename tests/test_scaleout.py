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
