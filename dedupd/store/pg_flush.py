"""Group commit for the claims of one PostgreSQL store: a worker does not wait for the
disk.

A claim commits without waiting for its WAL to reach the disk (the group's lock is
released at once). Before this, the worker then waited for a flush of its own (3-10 ms
on two busy cores, and half of a file's CPU on the database side); now it hands the
file's report to this thread and goes on with the next file. The thread gathers for a
few milliseconds, flushes once for every claim handed in meanwhile (a transaction that
commits with synchronous_commit on flushes the WAL up to its own commit, so every
commit before it), and only then says the reports.

A flush on the server start the claim committed on makes the claim durable. A crash in
between may have lost it: the flush that follows the restart finds another start
(`pg_postmaster_start_time()`), and each claim's row is looked up: there, its report is
said; gone, `lost` is called and the file is decided again (nothing was said about it,
so it is said exactly once). Whatever another host did because it saw the row is
flushed with it or not at all (it committed later in the same WAL), as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from dedupd.store.pg_schema import FLUSH
from dedupd.store.records import StoreError, path_to_db

log = logging.getLogger("dedupd.store.flush")

GATHER = 0.005  # how long the thread waits for more claims before one flush
_STOP_RETRIES = 1  # at close, how many more tries a flush gets before reports are dropped


@dataclass
class Pending:
    """A claim whose report waits for its flush."""

    image_id: int
    path: str
    epoch: datetime  # the server start the claim committed on
    report: Callable[[], None]
    lost: Callable[[], None]


class Flusher:
    """The thread that flushes claims in groups and then says their reports."""

    def __init__(self, run: Callable[[Callable[[psycopg.Connection], Any]], Any]) -> None:
        """run(fn): fn on a pooled connection, with the store's bounded retries."""
        self._run = run
        self._cond = threading.Condition()
        self._pending: list[Pending] = []
        self._busy = False  # a group is being flushed (drain() waits for it too)
        self._closing = False
        self._thread: threading.Thread | None = None

    def after(self, item: Pending) -> None:
        """Say item's report once its claim is durable (or call lost)."""
        with self._cond:
            self._pending.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dedupd-flush",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every report handed in so far has been said (or lost); bounded,
        for a stop while the database is away must still end within systemd's
        TimeoutStopSec."""
        with self._cond:
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not (self._pending or self._busy), timeout)

    def close(self) -> None:
        """Flush what is pending (a few tries), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(60)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                self._busy = True
            if not self._closing:
                time.sleep(GATHER)  # let the other workers' claims join this flush
            with self._cond:
                group, self._pending = self._pending, []
            try:
                self._settle(group)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _settle(self, group: list[Pending]) -> None:
        delay, tries = 0.1, 0
        while True:
            try:
                epoch, present = self._run(lambda conn: self._flush(conn, group))
                break
            except StoreError as exc:
                tries += 1
                if self._closing and tries > _STOP_RETRIES:
                    log.warning("%d accepted files not reported: the database was "
                                "unreachable at stop (%s); the next start decides any "
                                "whose record a crash lost", len(group), exc)
                    return
                log.debug("flush: %s", exc)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
        for item in group:
            try:
                if item.epoch == epoch or (item.image_id, path_to_db(item.path)) in present:
                    item.report()
                else:
                    item.lost()
            except Exception:  # one report's failure must not drop the others
                log.exception("reporting %s failed", item.path)

    @staticmethod
    def _flush(conn: psycopg.Connection, group: list[Pending]
               ) -> tuple[datetime, set[tuple[int, str]]]:
        """Flush every commit so far; the server's start time, and which of the rows of
        claims made on another start are still there."""
        (*_, epoch) = conn.execute(FLUSH + ", pg_postmaster_start_time()").fetchone()
        older = [item.image_id for item in group if item.epoch != epoch]
        if not older:
            return epoch, set()
        rows = conn.execute("SELECT id, path FROM images WHERE id = ANY(%s)",
                            (older,)).fetchall()
        return epoch, {(rid, path) for rid, path in rows}
