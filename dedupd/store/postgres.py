"""Shared hash dictionary on PostgreSQL: several ingest hosts, one truth.

Near-duplicate queries run in the database, sub-linear, by multi-index hashing (the
same pigeonhole scheme as the in-memory HammingIndex): the 64-bit hash is stored as a
BIGINT plus its four 16-bit substrings (generated columns), each with a partial btree
index over live records that also carries the hash and id, so the probes are
index-only scans. A query within distance d probes, per substring, every bucket within
floor(d/4) bits of its own (`= ANY(...)`), and filters candidates by
`bit_count((hash # q)::bit(64)) <= d`. 256-bit hashes (size 16) and radii beyond 3
(d >= 16) scan the (scope, recipe) instead: the pigeonhole over the low 64 bits does
not bound a 256-bit distance, and past radius 3 the probes cost more than a scan.

Ingest hosts answer lookups from a replica in memory (replica.py, loaded by warm()) and
keep a file by claim(): dedupd_claim, one round trip under the group's advisory lock,
re-checks what the replica had not seen and inserts. Without a replica, claim() is
check-then-insert under `locked(scope)`: a session-level advisory lock keyed on the
scope, on a connection pinned to the calling thread; every store call that thread makes
inside the block runs on that connection. Writes inside commit one by one (the
quarantine journal must be durable before a file moves), which is why that lock is
session-level.

Connection loss: calls outside a locked block retry with backoff (bounded), then raise
StoreError; inside one they fail at once (the lock went with the connection). A write
whose commit outcome is unknown is re-checked (by path, or the journal entry's key)
before it is retried, so nothing is recorded twice.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator

import psycopg

from dedupd.store import pg_schema
from dedupd.store.base import (
    LIVE_STATUSES,
    ImageRecord,
    Lookup,
    Match,
    QuarantineEntry,
    RecordGone,
    StoreError,
    nearest_first,
    path_from_db,
    path_to_db,
)
from dedupd.store.pg_flush import Flusher, Pending
from dedupd.store.pg_query import (
    LIVE,
    SELECT_IMAGE,
    hash_words,
    near_query,
    record_from_row,
    signed,
    split_hash,
)
from dedupd.store.pg_schema import CLAIM, SCHEMA_VERSION
from dedupd.store.pg_session import PgSession, lock_key, one_line, redact
from dedupd.store.replica import Replicas
from dedupd.store.sql import (
    QUAR_COLS,
    SQLStore,
    entry_from_row,
    entry_row,
    insert_quarantine_sql,
)

__all__ = ["SCHEMA_VERSION", "PostgresStore", "near_query", "redact"]

class PostgresStore(PgSession, SQLStore):
    """Store in a PostgreSQL database; safe to share between threads, processes and hosts.

    Larger than ~200 lines on purpose: the writes, the replica lookup and claim() share
    the collection numbers and the replicas, and claim's retry paths fall back on the
    plain lookup; the connection plumbing (pg_session), the schema (pg_schema) and the
    row layout and near query (pg_query) are apart already."""

    MARK, IMAGE_SELECT, BACKEND = "%s", SELECT_IMAGE, "postgresql"
    SCHEMA_VERSION = SCHEMA_VERSION
    _image = staticmethod(record_from_row)

    def __init__(self, url: str, *, pool_size: int = 16, attempts: int = 5,
                 timeout: float = 3.0, migrate: bool = True, replicate: bool = True) -> None:
        """replicate: warm() loads a replica of the group (hosts that ingest); without
        one, lookups and claims use the database's indexes under the group lock."""
        self._connect(url, attempts, timeout)
        self.replicate = replicate
        self._flusher = Flusher(self._run)
        self._replicas = Replicas(lambda: psycopg.connect(
            self._dsn, autocommit=True, application_name="dedupd-replica"))
        # Server-side time each claim held its group's lock (for benchmarks), bounded.
        self.claim_held_us: deque[float] = deque(maxlen=100_000)
        self._colls: dict[tuple[str, str], int] = {}
        self.migrated: tuple[int, int] = (SCHEMA_VERSION, SCHEMA_VERSION)
        try:  # one direct connection first: its error names the real problem
            with psycopg.connect(self._dsn, autocommit=True) as conn:
                # `options=-c synchronous_commit=off` in the DSN: claims are not flushed
                # one by one (see claim()); journal writes still are.
                self.durable = conn.execute("SHOW synchronous_commit").fetchone()[0] != "off"
                if migrate:
                    self.migrated = pg_schema.migrate(conn, self.url)
                else:
                    pg_schema.check_version(conn, self.url)
        except psycopg.Error as exc:
            raise StoreError(f"{self.url}: {one_line(exc)}") from None
        self._open_pool(pool_size)

    # -- plumbing
    def _write(self, sql: str, args: tuple, *, journal: bool = False) -> None:
        def write(conn: psycopg.Connection) -> None:
            conn.execute(sql, args)  # type: ignore[arg-type]
            if journal and not self.durable:  # on disk before the file moves
                self._flush(conn)

        self._run(write)

    def _bytes(self) -> int:
        (size,) = self._query("SELECT pg_total_relation_size('images') + "
                              "pg_total_relation_size('quarantine')")[0]
        return int(size)

    def close(self) -> None:
        self._flusher.close()  # reports waiting for a flush are said first
        self._replicas.close()
        self._pool.close()

    def _coll(self, conn: psycopg.Connection, scope: str, recipe: str, create: bool
              ) -> int | None:
        """The small integer naming (scope, recipe) in the substring indexes."""
        key = (scope, recipe)
        found = self._colls.get(key)
        if found is not None:
            return found
        sql = "SELECT id FROM collections WHERE scope = %s AND recipe = %s"
        row = conn.execute(sql, key).fetchone()
        if row is None and create:
            conn.execute("INSERT INTO collections (scope, recipe) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING", key)
            row = conn.execute(sql, key).fetchone()
        if row is None:
            return None
        with self._mutex:
            self._colls[key] = int(row[0])
        return int(row[0])

    # -- images
    def insert(self, record: ImageRecord) -> ImageRecord:
        return record.with_(id=self.insert_many([record])[0])

    def insert_many(self, records: list[ImageRecord]) -> list[int]:
        """One transaction: ids drawn from the sequence, rows loaded with COPY."""
        if not records:
            return []

        def write(conn: psycopg.Connection) -> list[int]:
            colls = {(r.scope, r.recipe): self._coll(conn, r.scope, r.recipe, True)
                     for r in records}
            per_coll = Counter(colls[(r.scope, r.recipe)] for r in records)
            with conn.transaction():
                ids = [row[0] for row in conn.execute(
                    "SELECT nextval(pg_get_serial_sequence('images', 'id')) "
                    "FROM generate_series(1, %s)", (len(records),))]
                # Numbers for the replicas' tails, collections in a fixed order (two bulk
                # writers never wait for each other crosswise).
                seqs = {c: conn.execute("SELECT dedupd_bump(%s, %s)", (c, n)).fetchone()[0]
                        - n for c, n in sorted(per_coll.items())}
                with conn.cursor().copy(
                        "COPY images (id, coll, scope, path, recipe, hash, hash_hi, digest, "
                        "file_size, mtime_ns, width, height, first_seen, status, seq, "
                        "signature) FROM STDIN") as copy:
                    for rid, r in zip(ids, records, strict=True):
                        low, high = split_hash(r.hash, hash_words(r.recipe))
                        coll = colls[(r.scope, r.recipe)]
                        seqs[coll] += 1
                        copy.write_row((rid, coll, r.scope, path_to_db(r.path), r.recipe, low, high,
                                        r.digest, r.file_size, r.mtime_ns, r.width, r.height,
                                        r.first_seen, r.status, seqs[coll], r.signature))
            return ids

        def committed(conn: psycopg.Connection) -> list[int] | None:
            rows = conn.execute(f"SELECT {SELECT_IMAGE} FROM images WHERE path = ANY(%s)",
                                ([path_to_db(r.path) for r in records],)).fetchall()
            by_path = {rec.path: rec for rec in map(record_from_row, rows)}
            if len(by_path) == len(records) and all(
                    by_path[r.path].digest == r.digest for r in records):
                return [by_path[r.path].id for r in records]  # type: ignore[misc]
            return None  # not committed (a transaction is all or nothing)

        try:
            return self._run(write, committed)
        except StoreError as exc:
            if "duplicate key" in str(exc):
                raise StoreError(f"insert failed: {exc}") from None
            raise

    def existing_paths(self, paths: list[str]) -> set[str]:
        rows = self._query("SELECT path FROM images WHERE path = ANY(%s)",
                           ([path_to_db(p) for p in paths],))
        return {path_from_db(row[0]) for row in rows}

    def update(self, record: ImageRecord) -> None:
        low, high = split_hash(record.hash, hash_words(record.recipe))

        def write(conn: psycopg.Connection) -> int:
            coll = self._coll(conn, record.scope, record.recipe, True)
            return conn.execute(
                "UPDATE images SET coll=%s, scope=%s, path=%s, recipe=%s, hash=%s, "
                "hash_hi=%s::bigint[], digest=%s, file_size=%s, mtime_ns=%s, width=%s, "
                "height=%s, first_seen=%s, status=%s, seq=dedupd_bump(%s, 1), "
                "signature=coalesce(%s::bytea, signature) WHERE id=%s",
                (coll, record.scope, path_to_db(record.path), record.recipe, low, high,
                 record.digest, record.file_size, record.mtime_ns, record.width, record.height,
                 record.first_seen, record.status, coll, record.signature,
                 record.id)).rowcount

        if self._run(write) == 0:
            raise RecordGone(f"no image record {record.id}")

    def signatures(self, ids: list[int]) -> dict[int, bytes]:
        rows = self._query("SELECT id, signature FROM images WHERE id = ANY(%s) "
                           "AND signature IS NOT NULL", (ids,))
        return {row[0]: bytes(row[1]) for row in rows}

    def delete(self, record_id: int) -> None:
        self._run(lambda conn: conn.execute("DELETE FROM images WHERE id = %s", (record_id,)))
        self._replicas.forget(record_id)  # other hosts' replicas learn it on a hit

    def iter_records(self, scope: str | None = None, prefix: str | None = None
                     ) -> Iterator[ImageRecord]:
        """Pages of 5,000: by path under a prefix (the path index), else by id. No
        connection is held between pages."""
        where, args = ["TRUE"], []
        if scope is not None:
            where.append("scope = %s")
            args.append(scope)
        key = "id"
        if prefix is not None:
            base = path_to_db(prefix.rstrip("/") + "/")
            where.append("path >= %s AND path < %s")  # byte order: the column is C-collated
            args += [base, base[:-1] + "0"]
            key = "path"
        last: object = None
        while True:
            page_where = where + ([f"{key} > %s"] if last is not None else [])
            page_args = args + ([last] if last is not None else [])
            rows = self._query(f"SELECT {SELECT_IMAGE} FROM images WHERE "
                               f"{' AND '.join(page_where)} ORDER BY {key} LIMIT 5000",
                               page_args)
            for row in rows:
                yield record_from_row(row)
            if len(rows) < 5000:
                return
            last = rows[-1][2] if key == "path" else rows[-1][0]

    def find_matches(self, scope: str, recipe: str, hash: int, digest: str | None,
                     max_distance: int, limit: int = 10) -> list[Match]:
        near, args = near_query(recipe, hash, max_distance, limit)

        def query(conn: psycopg.Connection) -> tuple[list[tuple], list[tuple]]:
            same = conn.execute(
                f"SELECT {SELECT_IMAGE} FROM images WHERE scope = %s AND digest = %s "
                f"AND status IN ({LIVE}) ORDER BY id LIMIT %s",
                (scope, digest, limit)).fetchall() if digest else []
            coll = self._coll(conn, scope, recipe, False)
            if coll is None:
                return same, []
            return same, conn.execute(near, {**args, "c": coll}).fetchall()  # type: ignore[arg-type]

        same, hits = self._run(query)
        found: dict[int, Match] = {}
        for row in same:
            rec = record_from_row(row)
            found[rec.id] = Match(rec, 0, True)  # type: ignore[index]
        for row in hits:
            rec = record_from_row(row)
            if rec.id not in found:
                found[rec.id] = Match(rec, int(row[13]),  # type: ignore[index]
                                      bool(digest) and rec.digest == digest)
        return nearest_first(found.values(), limit)

    def warm(self, scope: str, recipe: str) -> None:
        """Load this host's replica of (scope, recipe) (64-bit hashes; see replica.py)."""
        coll = self._run(lambda conn: self._coll(conn, scope, recipe, hash_words(recipe) == 1))
        if coll is None or hash_words(recipe) != 1 or not self.replicate:
            return
        try:
            self._replicas.want(coll)
        except psycopg.Error as exc:
            raise StoreError(f"{self.url}: loading the replica: {one_line(exc)}") from None

    def live_count(self, scope: str, recipe: str) -> int | None:
        coll = self._colls.get((scope, recipe))
        replica = self._replicas.get(coll) if coll is not None else None
        return len(replica.index) if replica is not None else None

    def lookup(self, scope: str, recipe: str, hash: int, digest: str | None,
               max_distance: int, limit: int = 10) -> Lookup:
        """From this host's replica when it has one: no lock, and a round trip only to
        read the hits' records (the replica may hold deleted ones; the database says)."""
        coll = self._colls.get((scope, recipe))
        replica = self._replicas.get(coll) if coll is not None else None
        if replica is None:
            return super().lookup(scope, recipe, hash, digest, max_distance, limit)
        watermark, hits = replica.query(hash, max_distance, limit)
        if digest and len(hits) >= limit:  # byte-identical copies may be beyond `limit`
            hits.update(replica.query(hash, 0, None)[1])
        horizon = (replica, watermark)
        if not hits:  # the claim checks the digest (and everything newer) anyway
            return Lookup([], horizon)
        rows = self._query(
            f"SELECT {SELECT_IMAGE}, coll FROM images WHERE id = ANY(%s) OR (scope = %s "
            f"AND digest = %s AND status IN ({LIVE}))", (list(hits), scope, digest or ""))
        found = self._matches(rows, coll, hash, digest, max_distance)
        for gone in set(hits) - {r[0] for r in rows}:  # deleted: the tail cannot see that
            replica.forget(gone)
        return Lookup(nearest_first(found, limit), horizon)

    @staticmethod
    def _matches(rows: list[tuple], coll: int, hash: int, digest: str | None,
                 max_distance: int) -> list[Match]:
        """Matches among rows (image columns + coll) as the database has them now."""
        found = []
        for row in rows:
            rec = record_from_row(row)
            if rec.status not in LIVE_STATUSES:
                continue
            if digest and rec.digest == digest:
                found.append(Match(rec, 0, True))
            elif row[13] == coll and (rec.hash ^ hash).bit_count() <= max_distance:
                found.append(Match(rec, (rec.hash ^ hash).bit_count(), False))
        return found

    def claim(self, record: ImageRecord, max_distance: int, seen: Lookup) -> list[Match]:
        """With a replica: one call of dedupd_claim, which under the group's lock
        re-checks only what the replica had not seen (rows numbered after its watermark,
        and the digest) and inserts, committing without waiting for the disk. The WAL is
        flushed after the lock is gone, before the decision is reported (settle()) or
        acted on (a quarantine journal write flushes it first): whatever another host
        does because it saw this row commits after it, so it cannot outlive it."""
        if not isinstance(seen.horizon, tuple) or record.id is not None:
            return super().claim(record, max_distance, seen)
        replica, watermark = seen.horizon
        args = (lock_key(record.scope), replica.epoch, replica.coll, watermark,
                [m.record.id for m in seen.matches], max_distance, record.scope,
                path_to_db(record.path),
                record.recipe, signed(record.hash), record.digest, record.file_size,
                record.mtime_ns, record.width, record.height, record.first_seen,
                record.status, record.signature)

        def write(conn: psycopg.Connection) -> tuple:
            # Prepared: not parsed and planned per file. It commits without waiting for
            # the disk; settle() has the report wait for a flush (pg_flush.py).
            return conn.execute(CLAIM, args, prepare=True).fetchone()

        def committed(conn: psycopg.Connection) -> tuple | None:
            row = conn.execute("SELECT id, digest FROM images WHERE path = %s",
                               (path_to_db(record.path),)).fetchone()
            return (row[0], None, None) if row and row[1] == record.digest else None

        try:
            new_id, conflicts, held = self._run(write, committed)
        except StoreError as exc:
            if "another server start" in str(exc):  # the replica may miss rows: drop it
                self._replicas.drop(replica)
                return super().claim(record, max_distance, seen)
            if "too far behind" in str(exc):  # paused for long: the indexes, this once
                return super().claim(record, max_distance, seen)
            if "duplicate key" in str(exc):
                raise StoreError(f"insert failed: {exc}") from None
            raise
        if held is not None:
            self.claim_held_us.append(held)
        if new_id is None:
            rows = self._query(f"SELECT {SELECT_IMAGE}, coll FROM images WHERE id = ANY(%s)",
                               (conflicts,))
            return nearest_first(self._matches(rows, replica.coll, record.hash,
                                               record.digest, max_distance), 8)
        replica.add_own(new_id, record.hash)
        self._tls.claimed = (record.path, new_id, replica.epoch)
        return []

    def settle(self, path: str, report: Callable[[], None], lost: Callable[[], None]
               ) -> None:
        """The claim of `path` this thread just made is durable only after a flush: the
        report waits for the next group flush, and the worker goes on (see pg_flush)."""
        claimed, self._tls.claimed = getattr(self._tls, "claimed", None), None
        if not self.durable or claimed is None or claimed[0] != path:
            report()
            return
        self._flusher.after(Pending(claimed[1], path, claimed[2], report, lost))

    def drain(self) -> None:
        self._flusher.drain()

    # -- quarantine journal
    def add_quarantine(self, entry: QuarantineEntry) -> QuarantineEntry:
        values = entry_row(entry)

        def write(conn: psycopg.Connection) -> QuarantineEntry:
            (qid,) = conn.execute(insert_quarantine_sql("%s") + " RETURNING id",
                                  values).fetchone()
            if not self.durable:  # the intent must be on disk before the file moves
                self._flush(conn)
            return QuarantineEntry(**{**entry.__dict__, "id": qid})

        def committed(conn: psycopg.Connection) -> QuarantineEntry | None:
            row = conn.execute(
                f"SELECT {QUAR_COLS} FROM quarantine WHERE original_path = %s "
                "AND quarantine_path = %s AND created = %s ORDER BY id DESC LIMIT 1",
                (values[1], values[2], entry.created)).fetchone()
            return entry_from_row(row) if row else None

        return self._run(write, committed)
