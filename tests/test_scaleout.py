"""Scale-out plumbing of the PostgreSQL store (issue #14) against real servers: what a
file costs in round trips must not cost correctness when the server goes away."""

from __future__ import annotations

from pathlib import Path

from test_postgres import PrivateCluster, private_cluster  # noqa: F401  (fixture)
from test_store import rec

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
