"""A host's in-memory copy of a shared group's live hashes, kept current by tailing.

Every write to `images` takes the next number of its collection's sequence
(`collections.seq`, bumped under that row's lock, so numbers commit in order within a
collection) and NOTIFYs `dedupd_images`. A replica is loaded once (every live hash of the
collection plus the sequence number the load's snapshot saw: the *watermark*), then a
tail thread re-reads the rows numbered after the watermark whenever it is woken, at most
every TAIL_INTERVAL seconds, and on a timer in case a notification was lost. Rows applied
in number order with nothing skipped mean: every row numbered <= watermark is in the
replica as committed (or superseded by a later number).

What a replica may get wrong, and why no decision is wrong because of it (README,
"Consistency"): it may lack rows numbered after its watermark (the group lock's claim
re-checks exactly those in the database), and it may still hold a record that was deleted
(every hit is re-read from the database before it is used). A server restart may lose
asynchronously committed rows and reuse their numbers, so a replica belongs to one server
incarnation (`pg_postmaster_start_time()`): the claim refuses another, and the tail
thread reloads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

import numpy as np
import psycopg
from psycopg import sql

from dedupd.store.base import LIVE_STATUSES
from dedupd.store.hamming import HammingIndex

log = logging.getLogger("dedupd.store.replica")

CHANNEL = "dedupd_images"
TAIL_INTERVAL = 0.02  # the most often a replica re-reads; bounds its lag when busy
POLL_SECONDS = 1.0  # re-read even without a notification (one may be lost on reconnect)
_LOAD_SLICES = 16  # the load reads the live-row index in 16 ranges of the low substring
_LOAD_CONNECTIONS = 4  # on that many connections at once
_TAIL_PAGE = 20_000
_LIVE = ", ".join(f"'{s}'" for s in LIVE_STATUSES)


class Replica:
    """The live 64-bit hashes of one collection, with the watermark they are exact to."""

    def __init__(self, coll: int, index: HammingIndex, watermark: int, epoch: datetime
                 ) -> None:
        self.coll, self.index, self.epoch = coll, index, epoch
        self.watermark = watermark
        self._lock = threading.Lock()  # one writer at a time (tail, own claims)

    def query(self, hash: int, max_distance: int, limit: int) -> tuple[int, dict[int, int]]:
        """(watermark, {id: distance}) of live hashes within max_distance. The watermark
        is read first: every row numbered up to it was applied before the query ran."""
        watermark = self.watermark
        hits = dict(self.index.query(hash, max_distance, limit))
        return watermark, hits

    def add_own(self, record_id: int, hash: int) -> None:
        """A row this host just claimed (durably): findable at once, before the tail
        reaches it (the watermark does not move)."""
        with self._lock:
            self.index.add(record_id, hash)

    def forget(self, record_id: int) -> None:
        """A hit the database no longer holds live (deleted: the tail cannot see that)."""
        with self._lock:
            self.index.remove(record_id)

    def apply(self, rows: list[tuple[int, int, int, str, int]]) -> None:
        """Rows (id, seq, hash, status, coll) numbered after the watermark, in order."""
        if not rows:
            return
        with self._lock:
            for rid, _seq, low, status, coll in rows:
                value = low & 0xFFFF_FFFF_FFFF_FFFF
                if coll == self.coll and status in LIVE_STATUSES:
                    if not self.index.has(rid, value):
                        self.index.add(rid, value)
                else:
                    self.index.remove(rid)
            self.watermark = rows[-1][1]


def load(conn: psycopg.Connection, coll: int,
         connect: Callable[[], psycopg.Connection] | None = None) -> Replica:
    """Every live hash of `coll` and the watermark, from one REPEATABLE READ snapshot.

    The live-row substring index (coll, s0) INCLUDE (hash, id) is read by index-only
    scans in slices of the substring's range; each slice comes back as one bytea of
    big-endian (id, hash) pairs, so 10M rows cost 16 round trips and no Python objects
    per row. With `connect`, _LOAD_CONNECTIONS more connections read the slices at once,
    all in the snapshot conn exported (pg_export_snapshot: what pg_dump -j does), so the
    server's scans and the client's copying overlap."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        watermark, epoch, snapshot = conn.execute(
            "SELECT seq, pg_postmaster_start_time(), pg_export_snapshot() FROM collections "
            "WHERE id = %s", (coll,)).fetchone()
        slices = list(range(0, 65536, 65536 // _LOAD_SLICES))
        parts: list[np.ndarray] = []
        failed: list[BaseException] = []
        lock = threading.Lock()

        def read(c: psycopg.Connection) -> None:
            cur = c.cursor(binary=True)
            while not failed:
                with lock:
                    if not slices:
                        return
                    lo = slices.pop()
                (blob,) = cur.execute(
                    "SELECT string_agg(int8send(id) || int8send(hash), ''::bytea) FROM "
                    f"images WHERE coll = %s AND s0 >= %s AND s0 < %s AND status IN ({_LIVE})",
                    (coll, lo, lo + 65536 // _LOAD_SLICES)).fetchone()
                if blob:
                    part = np.frombuffer(blob, ">i8").reshape(-1, 2)
                    with lock:
                        parts.append(part)

        def helper() -> None:
            try:
                with connect() as c, c.transaction():  # type: ignore[misc]
                    c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    c.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                    read(c)
            except BaseException as exc:  # noqa: BLE001  (re-raised below)
                failed.append(exc)

        if connect is None:
            read(conn)
        else:  # conn holds the snapshot open while the others read in it
            helpers = [threading.Thread(target=helper, name="dedupd-replica-load",
                                        daemon=True) for _ in range(_LOAD_CONNECTIONS)]
            for t in helpers:
                t.start()
            for t in helpers:
                t.join()
        if failed:
            raise failed[0]
    pairs = np.concatenate(parts) if parts else np.empty((0, 2), ">i8")
    parts.clear()
    ids = pairs[:, 0].astype(np.int64)
    hashes = pairs[:, 1].astype(np.int64).view(np.uint64)
    del pairs
    index = HammingIndex(64)
    index.adopt(ids, hashes)
    return Replica(coll, index, int(watermark), epoch)


def tail_rows(conn: psycopg.Connection, coll: int, after: int
              ) -> list[tuple[int, int, int, str, int]]:
    """The next page of rows of `coll` numbered after `after`, in number order."""
    return conn.execute(
        "SELECT id, seq, hash, status, coll FROM images WHERE coll = %s AND seq > %s "
        "ORDER BY seq LIMIT %s", (coll, after, _TAIL_PAGE)).fetchall()


class Replicas:
    """A store's replicas by collection, and the one thread that keeps them current.

    The thread LISTENs and, when woken (or every POLL_SECONDS), reloads replicas that
    are missing or belong to another server start, and applies the rows numbered after
    each watermark. Connection trouble is retried quietly: the daemon's own ping reports
    outages, and lag never makes a decision wrong (the claim re-checks)."""

    def __init__(self, connect: Callable[[], psycopg.Connection]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._by_coll: dict[int, Replica] = {}
        self._wanted: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, coll: int) -> Replica | None:
        return self._by_coll.get(coll)

    def want(self, coll: int) -> Replica:
        """The replica of coll, loaded now if needed; the tail thread starts with the first."""
        with self._lock:
            replica = self._by_coll.get(coll)
            if replica is None:
                with self._connect() as conn:
                    replica = self._by_coll[coll] = load(conn, coll, self._connect)
                self._wanted.add(coll)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="dedupd-replica-tail")
                self._thread.start()
            return replica

    def forget(self, record_id: int) -> None:
        """A record this host deleted leaves its replicas at once."""
        for replica in list(self._by_coll.values()):
            replica.forget(record_id)

    def drop(self, replica: Replica) -> None:
        """Stop using a replica (its server restarted): the tail thread reloads it."""
        with self._lock:
            if self._by_coll.get(replica.coll) is replica:
                del self._by_coll[replica.coll]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    self._follow(conn)
            except psycopg.Error as exc:
                log.debug("replica tail: %s", exc)
            self._stop.wait(delay)
            delay = min(2 * delay, 2.0)

    def _follow(self, conn: psycopg.Connection) -> None:
        # A server start ends every connection, so one reading per connection is exact.
        (epoch,) = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        while not self._stop.is_set():
            started = time.monotonic()
            self.catch_up(conn, epoch)
            # Wake on a notification (or the poll timer); rate-limited, so that a busy
            # group costs each host a few dozen reads a second, not one per row.
            for _ in conn.notifies(timeout=POLL_SECONDS, stop_after=1):
                pass
            rest = TAIL_INTERVAL - (time.monotonic() - started)
            if rest > 0:
                self._stop.wait(rest)

    def catch_up(self, conn: psycopg.Connection, epoch: datetime) -> None:
        """Bring every wanted replica up to date on conn, whose server started at
        `epoch` (reloading those of another start, or missing)."""
        with self._lock:
            wanted = sorted(self._wanted)
        for coll in wanted:
            replica = self._by_coll.get(coll)
            if replica is None or replica.epoch != epoch:
                if replica is not None:
                    self.drop(replica)
                fresh = load(conn, coll, self._connect)
                with self._lock:
                    self._by_coll[coll] = fresh
                continue
            while True:
                rows = tail_rows(conn, coll, replica.watermark)
                replica.apply(rows)
                if len(rows) < _TAIL_PAGE:
                    break
