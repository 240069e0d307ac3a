"""Connections of the PostgreSQL store: the pool, bounded retries, and the group locks
(session-level advisory locks on a connection pinned to the calling thread; every call
that thread makes inside the block runs on it). See postgres.py for why."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from dedupd.store.base import StoreError
from dedupd.store.pg_schema import FLUSH, LOCK_NS

T = TypeVar("T")
# The pool's own reconnect chatter: outages are reported once, as dedupd events.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

# Defaults for connection parameters the DSN does not set (TLS and the rest pass through):
# dead peers are noticed within ~30 s instead of the kernel's two hours.
CONN_DEFAULTS = {"application_name": "dedupd", "connect_timeout": "5", "keepalives": "1",
                 "keepalives_idle": "15", "keepalives_interval": "5", "keepalives_count": "3"}


def redact(url: str) -> str:
    """The DSN without its password, for logs and STATUS."""
    url = re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", url)


def one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or \
        type(exc).__name__


def lock_key(scope: str) -> int:
    """A stable signed 32-bit key per scope (a collision only serialises two groups)."""
    return int.from_bytes(hashlib.blake2b(scope.encode(), digest_size=4).digest(), "big",
                          signed=True)


@dataclass
class _Pin:
    """A connection pinned to one thread while it holds advisory locks."""

    conn: psycopg.Connection
    depth: int = 0
    broken: bool = False
    scopes: list[str] = field(default_factory=list)


class PgSession:
    """The connection plumbing PostgresStore is built on (a base class, so that its
    queries read `self._run(...)` like the SQLite store's)."""

    url: str

    def _connect(self, url: str, attempts: int, timeout: float) -> None:
        """Take the DSN apart (defaults for what it does not set), for _open_pool."""
        self.url = redact(url)
        params = conninfo_to_dict(url)
        for key, value in CONN_DEFAULTS.items():
            params.setdefault(key, value)
        self._dsn = make_conninfo(**params)
        self.attempts, self.timeout = attempts, timeout
        self._tls = threading.local()
        self._mutex = threading.Lock()
        self._scope_locks: dict[str, threading.RLock] = {}

    def _open_pool(self, pool_size: int) -> None:
        # No check of each connection as it is handed out: that is a round trip per
        # call (with a replica, half of a file's). A connection that died is found by
        # the call that uses it, which _run retries once pool.check() has replaced every
        # dead one (a server restart kills them all at once).
        self._pool = ConnectionPool(
            self._dsn, min_size=1, max_size=pool_size, kwargs={"autocommit": True},
            configure=self._configure, open=False, name="dedupd", reconnect_timeout=60)
        try:
            self._pool.open(wait=True, timeout=10)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"{self.url}: {one_line(exc)}") from None

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        # A host wedged while holding a group's lock must not stall the others forever.
        conn.execute("SET lock_timeout = '60s'")

    def _run(self, fn: Callable[[psycopg.Connection], T],
             recheck: Callable[[psycopg.Connection], T | None] | None = None) -> T:
        """fn(conn) on the thread's pinned connection, else on a pooled one with bounded
        retries. `recheck` runs before a retry of a write whose outcome is unknown and
        returns its result if it did commit."""
        pin: _Pin | None = getattr(self._tls, "pin", None)
        if pin is not None:
            if pin.broken:
                raise StoreError(f"{self.url}: the connection holding the lock of "
                                 f"{pin.scopes[-1]!r} was lost")
            try:
                return fn(pin.conn)
            except psycopg.OperationalError as exc:
                pin.broken = True
                raise StoreError(f"{self.url}: database unavailable: {one_line(exc)}") \
                    from None
            except psycopg.Error as exc:
                raise StoreError(f"{self.url}: {one_line(exc)}") from None
        delay, last = 0.1, None
        for attempt in range(self.attempts):
            try:
                with self._pool.connection(timeout=self.timeout) as conn:
                    if attempt and recheck is not None:
                        done = recheck(conn)
                        if done is not None:
                            return done
                    return fn(conn)
            except psycopg.OperationalError as exc:
                last = exc
                self._pool.check()  # the others may be dead too (a server restart)
            except psycopg.Error as exc:
                raise StoreError(f"{self.url}: {one_line(exc)}") from None
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        raise StoreError(f"{self.url}: database unavailable: {one_line(last)}")  # type: ignore[arg-type]

    def _query(self, sql: str, args: Any = ()) -> list[tuple]:
        return self._run(lambda conn: conn.execute(sql, args).fetchall())  # type: ignore[arg-type]

    def ping(self) -> None:
        """One quick round trip: is the database reachable right now? Asked again once
        if the pooled connection had died (a server that restarted is reachable)."""
        for attempt in range(2):
            try:
                with self._pool.connection(timeout=self.timeout) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if attempt:
                    raise StoreError(f"{self.url}: database unavailable: {one_line(exc)}") \
                        from None
                self._pool.check()
            except psycopg.Error as exc:
                raise StoreError(f"{self.url}: database unavailable: {one_line(exc)}") \
                    from None

    @staticmethod
    def _flush(conn: psycopg.Connection, image_id: int | None = None) -> object:
        """Make every commit so far durable: a transactional WAL message commits with
        synchronous_commit on, which flushes the WAL up to it. With image_id: only if
        that row is there (a crash may have taken it), else None."""
        if image_id is None:
            return conn.execute(FLUSH).fetchone()
        return conn.execute(FLUSH + " FROM images WHERE id = %s", (image_id,)).fetchone()

    def locked(self, scope: str) -> AbstractContextManager[None]:
        with self._mutex:
            local = self._scope_locks.setdefault(scope, threading.RLock())
        return self._hold(scope, local)

    @contextmanager
    def _hold(self, scope: str, local: threading.RLock) -> Iterator[None]:
        key = lock_key(scope)
        # Threads of this process queue on a local lock first, so waiting costs no
        # database connection; hosts queue on the advisory lock.
        with local:
            pin: _Pin | None = getattr(self._tls, "pin", None)
            owner = pin is None
            if owner:
                pin = self._pin(key)
                self._tls.pin = pin
            else:
                self._run(lambda conn: conn.execute(
                    "SELECT pg_advisory_lock(%s, %s)", (LOCK_NS, key)))
            assert pin is not None
            pin.depth += 1
            pin.scopes.append(scope)
            try:
                yield
            finally:
                pin.depth -= 1
                pin.scopes.pop()
                if not pin.broken:
                    try:
                        pin.conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_NS, key))
                    except psycopg.Error:
                        pin.broken = True
                if owner:
                    self._tls.pin = None
                    if pin.broken:
                        pin.conn.close()
                    self._pool.putconn(pin.conn)

    def _pin(self, key: int) -> _Pin:
        """A pooled connection holding the advisory lock `key` (retried: nothing is held
        until the lock is granted)."""
        delay, last = 0.1, None
        for attempt in range(self.attempts):
            conn = None
            try:
                conn = self._pool.getconn(timeout=self.timeout)
                conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_NS, key))
                return _Pin(conn)
            except psycopg.OperationalError as exc:
                last = exc
                if conn is not None:
                    conn.close()
                    self._pool.putconn(conn)
                self._pool.check()
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        raise StoreError(f"{self.url}: cannot take the group lock: {one_line(last)}")  # type: ignore[arg-type]
