"""Embedded hash dictionary: one SQLite file in WAL mode plus an in-memory Hamming index.

Durability: WAL with synchronous=NORMAL. A killed process never corrupts or loses a
committed transaction; a power cut may lose the last few commits, which start-up
reconciliation repairs from the disk (files are the truth, the index follows them).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from dedupd.hashing import Recipe, bytes_to_hash
from dedupd.store.base import (
    ImageRecord,
    Match,
    QuarantineEntry,
    RecordGone,
    StoreError,
    StoreMissing,
    nearest_first,
    path_from_db,
    path_to_db,
)
from dedupd.store.hamming import HammingIndex
from dedupd.store.sql import SQLStore, entry_row, insert_quarantine_sql
from dedupd.store.sqlite_index import IndexedRows, in_chunks

_IMAGE_COLS = ("id, scope, path, recipe, hash, digest, file_size, mtime_ns, width, height, "
               "first_seen, status")

# Each entry migrates user_version i -> i+1. Never edit a released entry; append.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        scope TEXT NOT NULL,
        path TEXT NOT NULL UNIQUE,
        recipe TEXT NOT NULL,
        hash BLOB NOT NULL,
        digest TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        first_seen REAL NOT NULL,
        status TEXT NOT NULL
    );
    CREATE INDEX images_digest ON images (scope, digest);
    CREATE INDEX images_hash ON images (scope, recipe, hash);
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        image_id INTEGER,
        original_path TEXT NOT NULL,
        quarantine_path TEXT NOT NULL,
        matched_path TEXT NOT NULL,
        distance INTEGER NOT NULL,
        hash TEXT NOT NULL,
        policy TEXT NOT NULL,
        reason TEXT NOT NULL,
        created REAL NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX quarantine_state ON quarantine (state);
    """,
    # 2: a counter bumped by every write transaction, to know whether a snapshot of the
    # in-memory index is still exact.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta VALUES ('generation', 0);
    DROP INDEX images_hash;
    CREATE INDEX images_live ON images (scope, recipe, status, hash);
    """,
    # 3: near-duplicate and identical-content lookups are served by the in-memory index
    # (byte-identical files have equal hashes), so the two secondary indexes on random
    # keys go: they cost two thirds of insert time at millions of rows. The in-memory
    # index persists as a snapshot plus index_log, the ids updated or deleted since.
    """
    DROP INDEX images_digest;
    DROP INDEX images_live;
    CREATE TABLE index_log (seq INTEGER PRIMARY KEY, image_id INTEGER NOT NULL);
    INSERT INTO meta VALUES ('log_floor', 0);
    """,
    # 4: the confirming signature of each image (dedupd.signature), read only for
    # candidates; NULL for records written before it (they match on the hash alone).
    """
    ALTER TABLE images ADD COLUMN signature BLOB;
    """,
    # 5: paths of any bytes (store.base.path_to_db): backslashes already stored are
    # doubled; rejected files are remembered (logged once until they change).
    """
    UPDATE images SET path = replace(path, '\\', '\\\\') WHERE instr(path, '\\') > 0;
    UPDATE quarantine SET original_path = replace(original_path, '\\', '\\\\'),
        quarantine_path = replace(quarantine_path, '\\', '\\\\'),
        matched_path = replace(matched_path, '\\', '\\\\')
        WHERE instr(original_path || quarantine_path || matched_path, '\\') > 0;
    CREATE TABLE rejections (
        path TEXT PRIMARY KEY,
        file_size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        seen REAL NOT NULL
    );
    """,
    # 6: how a quarantined file matched (the review shows it); the unresolved records
    # (the pending gauge, the review's list) indexed apart, so that counting them does
    # not read every row. Partial: the millions of kept rows do not pay for it.
    """
    ALTER TABLE quarantine ADD COLUMN transform TEXT;
    ALTER TABLE quarantine ADD COLUMN low_information INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX images_unresolved ON images (id) WHERE status = 'unresolved';
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
ITER_PAGE = 5000
READER_CACHE_KIB = 8192


@functools.lru_cache(maxsize=64)
def _hash_bytes(recipe: str) -> int:
    return Recipe.from_key(recipe).bits // 8


def _hash_blob(record: ImageRecord) -> bytes:
    return record.hash.to_bytes(_hash_bytes(record.recipe), "little")


def _record(row: tuple) -> ImageRecord:
    (rid, scope, path, recipe, blob, digest, size, mtime, w, h, seen, status) = row
    return ImageRecord(scope, path_from_db(path), recipe, bytes_to_hash(blob), digest, size,
                       mtime, w, h, seen, status, rid)


class SQLiteStore(IndexedRows, SQLStore):
    """Store in one SQLite file; safe to share between threads of one process."""

    MARK, IMAGE_SELECT, BACKEND = "?", _IMAGE_COLS, "sqlite"
    SCHEMA_VERSION = SCHEMA_VERSION
    _image = staticmethod(_record)

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite://{self.path}"
        if not create and not os.path.exists(self.path):
            raise StoreMissing(f"{self.path}: no such index (run a scan or the daemon "
                               "first)")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB: index pages of big stores
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        self._lock = threading.RLock()  # the writer connection (and the loaded indexes)
        self._local = threading.local()  # per thread: its reader, whether it is writing
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._scope_locks: dict[str, threading.RLock] = {}
        self._indexes: dict[tuple[str, str], HammingIndex] = {}
        self._saved_at: dict[tuple[str, str], tuple[int, int]] = {}  # (max id, log seq)

    # -- plumbing
    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        self.migrated = (int(version), SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"dedupd ({SCHEMA_VERSION}); upgrade dedupd")
        for target in range(version, SCHEMA_VERSION):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {target + 1}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._local.writing = getattr(self._local, "writing", 0) + 1
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                self._local.writing -= 1

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Reads run on the calling thread's own connection: in WAL mode readers do not
        wait for the writer or for each other, so a reconcile's bulk listing does not
        hold up a live file's lookup and insert. A thread inside a write transaction
        reads on the writer (its own uncommitted rows)."""
        if getattr(self._local, "writing", 0):
            return self._db.execute(sql, args).fetchall()
        return self._reader().execute(sql, args).fetchall()

    def _reader(self) -> sqlite3.Connection:
        reader: sqlite3.Connection | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = sqlite3.connect(self.path, check_same_thread=False,
                                     isolation_level=None, timeout=30)
            # A small cache each: the OS's page cache is shared; this one is per thread.
            reader.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            with self._readers_lock:  # not the writer's lock: a reader never waits for it
                self._readers.append(reader)
            self._local.reader = reader
        return reader

    def _write(self, sql: str, args: tuple, *, journal: bool = False) -> None:
        with self._tx() as db:  # every commit is durable against a killed process
            db.execute(sql, args)

    def _bytes(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, self.path + "-wal")
                   if os.path.exists(p))

    def close(self) -> None:
        with self._lock:
            try:
                self.checkpoint()
            finally:
                with self._readers_lock:
                    for reader in self._readers:
                        reader.close()
                self._db.close()

    # -- images
    def insert(self, record: ImageRecord) -> ImageRecord:
        return record.with_(id=self.insert_many([record])[0])

    def insert_many(self, records: list[ImageRecord]) -> list[int]:
        """One transaction; rows get consecutive ids after the current maximum (the
        write lock is held, so nobody else can take one in between)."""
        if not records:
            return []
        try:
            with self._tx() as db:
                (top,) = db.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()
                ids = range(top + 1, top + 1 + len(records))
                blobs = [_hash_blob(r) for r in records]
                db.executemany(
                    f"INSERT INTO images ({_IMAGE_COLS}, signature) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(i, r.scope, path_to_db(r.path), r.recipe, blob, r.digest, r.file_size,
                      r.mtime_ns, r.width, r.height, r.first_seen, r.status, r.signature)
                     for i, r, blob in zip(ids, records, blobs, strict=True)],
                )
                self._index_add(records, ids, blobs)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"insert failed: {exc}") from None
        return list(ids)

    def existing_paths(self, paths: list[str]) -> set[str]:
        found: set[str] = set()
        for marks, chunk in in_chunks([path_to_db(p) for p in paths]):
            found.update(path_from_db(row[0]) for row in self._query(
                f"SELECT path FROM images WHERE path IN ({marks})", chunk))
        return found

    def update(self, record: ImageRecord) -> None:
        with self._tx() as db:
            old = self.get(record.id)  # type: ignore[arg-type]
            if old is None:
                raise RecordGone(f"no image record {record.id}")
            db.execute(
                "UPDATE images SET scope=?, path=?, recipe=?, hash=?, digest=?, file_size=?, "
                "mtime_ns=?, width=?, height=?, first_seen=?, status=?, "
                "signature=coalesce(?, signature) WHERE id=?",
                (record.scope, path_to_db(record.path), record.recipe, _hash_blob(record),
                 record.digest, record.file_size, record.mtime_ns, record.width, record.height,
                 record.first_seen, record.status, record.signature, record.id),
            )
            self._index_sync(old, record)

    def delete(self, record_id: int) -> None:
        with self._tx() as db:
            old = self.get(record_id)
            db.execute("DELETE FROM images WHERE id = ?", (record_id,))
            self._index_sync(old, None)

    def iter_records(self, scope: str | None = None, prefix: str | None = None
                     ) -> Iterator[ImageRecord]:
        """Streams a page at a time (keyset paging on path under a prefix, else on id):
        a 10M-row scan never holds 10M objects, and writers get the lock between pages."""
        key, where, args = "id", ["id > ?"], [0]
        if prefix is not None:
            base = path_to_db(prefix.rstrip("/") + "/")
            # Range scan instead of LIKE: paths may contain % and _.
            key, where, args = "path", ["path > ?", "path < ?"], [base, base[:-1] + "0"]
        if scope is not None:
            where.append("scope = ?")
            args.append(scope)
        column = _IMAGE_COLS.split(", ").index(key)
        while rows := self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE "
                                  f"{' AND '.join(where)} ORDER BY {key} LIMIT {ITER_PAGE}",
                                  tuple(args)):
            yield from map(_record, rows)
            args[0] = rows[-1][column]

    def signatures(self, ids: list[int]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for marks, chunk in in_chunks(ids):
            found.update(self._query(f"SELECT id, signature FROM images WHERE id IN ({marks}) "
                                     "AND signature IS NOT NULL", chunk))
        return found

    def find_matches(self, scope: str, recipe: str, hash: int, digest: str | None,
                     max_distance: int, limit: int = 10) -> list[Match]:
        index = self._index(scope, recipe)
        hits = dict(index.query(hash, max_distance, limit))
        if digest and len(hits) >= limit:
            # Byte-identical copies hash alike: they are among the exact matches, which
            # `limit` may have cut (thousands of flat images share a hash).
            hits.update(index.query(hash, 0))
        records: dict[int, ImageRecord] = {}
        for marks, chunk in in_chunks(list(hits)):
            for row in self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE id IN ({marks})",
                                   chunk):
                records[row[0]] = _record(row)
        return nearest_first((Match(rec, hits[i], bool(digest) and rec.digest == digest)
                              for i, rec in records.items()), limit)

    def locked(self, scope: str) -> AbstractContextManager[None]:
        with self._lock:
            lock = self._scope_locks.setdefault(scope, threading.RLock())

        @contextmanager
        def hold() -> Iterator[None]:
            with lock:
                yield

        return hold()

    # -- quarantine journal
    def add_quarantine(self, entry: QuarantineEntry) -> QuarantineEntry:
        with self._tx() as db:
            cur = db.execute(insert_quarantine_sql("?"), entry_row(entry))
        return QuarantineEntry(**{**entry.__dict__, "id": cur.lastrowid})
