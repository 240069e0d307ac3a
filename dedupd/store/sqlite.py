"""Embedded hash dictionary: one SQLite file in WAL mode plus an in-memory Hamming index.

Durability: WAL with synchronous=NORMAL. A killed process never corrupts or loses a
committed transaction; a power cut may lose the last few commits, which start-up
reconciliation repairs from the disk (files are the truth, the index follows them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np

from dedupd.hashing import Recipe, bytes_to_hash
from dedupd.store.base import (
    LIVE_STATUSES,
    ImageRecord,
    Match,
    QuarantineEntry,
    Store,
    StoreError,
    nearest_first,
)
from dedupd.store.hamming import HammingIndex

_IMAGE_COLS = ("id, scope, path, recipe, hash, digest, file_size, mtime_ns, width, height, "
               "first_seen, status")
_QUAR_COLS = ("id, image_id, original_path, quarantine_path, matched_path, distance, hash, "
              "policy, reason, created, state")

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
)
SCHEMA_VERSION = len(MIGRATIONS)


@functools.lru_cache(maxsize=64)
def _hash_bytes(recipe: str) -> int:
    return Recipe.from_key(recipe).bits // 8


def _hash_blob(record: ImageRecord) -> bytes:
    return record.hash.to_bytes(_hash_bytes(record.recipe), "little")


def _record(row: tuple) -> ImageRecord:
    (rid, scope, path, recipe, blob, digest, size, mtime, w, h, seen, status) = row
    return ImageRecord(scope, path, recipe, bytes_to_hash(blob), digest, size, mtime, w, h,
                       seen, status, rid)


def _entry(row: tuple) -> QuarantineEntry:
    (qid, image_id, orig, qpath, matched, dist, hexhash, policy, reason, created, state) = row
    return QuarantineEntry(orig, qpath, matched, dist, hexhash, policy, image_id, reason,
                           created, state, qid)


class SQLiteStore(Store):
    """Store in one SQLite file; safe to share between threads of one process."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite://{self.path}"
        if not create and not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such index (run a scan or the daemon first)")
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
        self._lock = threading.RLock()
        self._scope_locks: dict[str, threading.RLock] = {}
        self._indexes: dict[tuple[str, str], HammingIndex] = {}
        self._snapshot_gen: dict[tuple[str, str], int] = {}

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
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            try:
                self._save_snapshots()
            finally:
                self._db.close()

    # -- snapshots: a 10M-entry index loads in a fraction of a second instead of a
    # minute of row-by-row SELECT. Exact or ignored: a snapshot is used only if no
    # write transaction happened since it was taken (the generation counter).
    def _generation(self) -> int:
        return int(self._db.execute(
            "SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _snapshot_path(self, scope: str, recipe: str) -> str:
        tag = hashlib.sha1(f"{scope}\0{recipe}".encode()).hexdigest()[:16]
        return f"{self.path}.hamming-{tag}.npz"

    def _save_snapshots(self) -> None:
        generation = self._generation()
        for (scope, recipe), index in self._indexes.items():
            if self._snapshot_gen.get((scope, recipe)) == generation or len(index) < 100_000:
                continue  # unchanged, or small enough to load from SQL quickly
            path = self._snapshot_path(scope, recipe)
            ids, hashes = index.export()
            tmp = path + ".tmp"
            try:
                with open(tmp, "wb") as fh:
                    np.savez(fh, ids=ids, hashes=hashes, generation=np.int64(generation))
                os.replace(tmp, path)
            except OSError:  # a snapshot is an optimisation; never fail a close for it
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _load_snapshot(self, scope: str, recipe: str, index: HammingIndex) -> bool:
        path = self._snapshot_path(scope, recipe)
        try:
            with np.load(path) as snap:
                if int(snap["generation"]) != self._generation():
                    return False
                index.add_many(snap["ids"], snap["hashes"])
        except (OSError, ValueError, KeyError):
            return False
        self._snapshot_gen[(scope, recipe)] = self._generation()
        return True

    def warm(self, scope: str, recipe: str) -> None:
        self._index(scope, recipe)

    # -- in-memory index, loaded per (scope, recipe) on first use
    def _index(self, scope: str, recipe: str) -> HammingIndex:
        key = (scope, recipe)
        with self._lock:
            index = self._indexes.get(key)
            if index is None:
                bits = Recipe.from_key(recipe).bits
                index = HammingIndex(bits)
                if self._load_snapshot(scope, recipe, index):
                    self._indexes[key] = index
                    return index
                cur = self._db.execute(
                    "SELECT id, hash FROM images WHERE scope = ? AND recipe = ? "
                    f"AND status IN ({','.join('?' * len(LIVE_STATUSES))})",
                    (scope, recipe, *LIVE_STATUSES),
                )
                # Chunks keep memory flat and feed numpy without per-row Python objects.
                while rows := cur.fetchmany(200_000):
                    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                    hashes = np.frombuffer(b"".join([r[1] for r in rows]), "<u8")
                    index.add_many(ids, hashes.reshape(len(rows), bits // 64))
                self._indexes[key] = index
            return index

    def _index_sync(self, old: ImageRecord | None, new: ImageRecord | None) -> None:
        """Keep loaded indexes equal to the live rows after a write."""
        if old is not None and old.status in LIVE_STATUSES:
            loaded = self._indexes.get((old.scope, old.recipe))
            if loaded is not None:
                loaded.remove(old.id)  # type: ignore[arg-type]
        if new is not None and new.status in LIVE_STATUSES:
            loaded = self._indexes.get((new.scope, new.recipe))
            if loaded is not None:
                loaded.add(new.id, new.hash)  # type: ignore[arg-type]

    # -- images
    def insert(self, record: ImageRecord) -> ImageRecord:
        return self.insert_many([record])[0]

    def insert_many(self, records: list[ImageRecord]) -> list[ImageRecord]:
        """One transaction; rows get consecutive rowids after the current maximum (the
        write lock is held, so nobody else can take one in between)."""
        if not records:
            return []
        try:
            with self._tx() as db:
                (top,) = db.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()
                db.executemany(
                    f"INSERT INTO images ({_IMAGE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(top + i, r.scope, r.path, r.recipe, _hash_blob(r), r.digest,
                      r.file_size, r.mtime_ns, r.width, r.height, r.first_seen, r.status)
                     for i, r in enumerate(records, 1)],
                )
                out = [ImageRecord(r.scope, r.path, r.recipe, r.hash, r.digest, r.file_size,
                                   r.mtime_ns, r.width, r.height, r.first_seen, r.status, top + i)
                       for i, r in enumerate(records, 1)]
                self._index_add(out)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"insert failed: {exc}") from None
        return out

    def _index_add(self, records: list[ImageRecord]) -> None:
        """Add live records to the loaded indexes, in bulk per (scope, recipe)."""
        groups: dict[tuple[str, str], list[ImageRecord]] = {}
        for r in records:
            if r.status in LIVE_STATUSES and (r.scope, r.recipe) in self._indexes:
                groups.setdefault((r.scope, r.recipe), []).append(r)
        for key, recs in groups.items():
            index = self._indexes[key]
            ids = np.fromiter((r.id for r in recs), np.int64, len(recs))  # type: ignore[misc]
            blob = b"".join(_hash_blob(r) for r in recs)
            index.add_many(ids, np.frombuffer(blob, "<u8").reshape(len(recs), -1))

    def existing_paths(self, paths: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(paths), 500):  # under SQLite's bound-parameter limit
            chunk = paths[i:i + 500]
            found.update(row[0] for row in self._query(
                f"SELECT path FROM images WHERE path IN ({','.join('?' * len(chunk))})",
                tuple(chunk)))
        return found

    def get(self, record_id: int) -> ImageRecord | None:
        rows = self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (record_id,))
        return _record(rows[0]) if rows else None

    def get_by_path(self, path: str) -> ImageRecord | None:
        rows = self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE path = ?", (path,))
        return _record(rows[0]) if rows else None

    def update(self, record: ImageRecord) -> None:
        with self._tx() as db:
            old = self.get(record.id)  # type: ignore[arg-type]
            if old is None:
                raise StoreError(f"no image record {record.id}")
            db.execute(
                "UPDATE images SET scope=?, path=?, recipe=?, hash=?, digest=?, file_size=?, "
                "mtime_ns=?, width=?, height=?, first_seen=?, status=? WHERE id=?",
                (record.scope, record.path, record.recipe, _hash_blob(record), record.digest,
                 record.file_size, record.mtime_ns, record.width, record.height,
                 record.first_seen, record.status, record.id),
            )
            self._index_sync(old, record)

    def delete(self, record_id: int) -> None:
        with self._tx() as db:
            old = self.get(record_id)
            db.execute("DELETE FROM images WHERE id = ?", (record_id,))
            self._index_sync(old, None)

    def iter_records(self, scope: str | None = None, prefix: str | None = None
                     ) -> Iterator[ImageRecord]:
        sql, args = f"SELECT {_IMAGE_COLS} FROM images WHERE 1=1", []
        if scope is not None:
            sql += " AND scope = ?"
            args.append(scope)
        if prefix is not None:
            base = prefix.rstrip("/") + "/"
            # Range scan instead of LIKE: paths may contain % and _.
            sql += " AND path >= ? AND path < ?"
            args += [base, base[:-1] + "0"]
        last = 0  # pages by id: a 10M-row export never holds every row in memory
        while rows := self._query(sql + " AND id > ? ORDER BY id LIMIT 5000",
                                  (*args, last)):
            yield from map(_record, rows)
            last = rows[-1][0]

    def find_matches(self, scope: str, recipe: str, hash: int, digest: str | None,
                     max_distance: int, limit: int = 10) -> list[Match]:
        live = ",".join("?" * len(LIVE_STATUSES))
        found: dict[int, Match] = {}
        if digest:
            for row in self._query(
                f"SELECT {_IMAGE_COLS} FROM images WHERE scope = ? AND digest = ? "
                f"AND status IN ({live}) ORDER BY id LIMIT ?",
                (scope, digest, *LIVE_STATUSES, limit),
            ):
                rec = _record(row)
                found[rec.id] = Match(rec, 0, True)  # type: ignore[index]
        hits = self._index(scope, recipe).query(hash, max_distance, limit)
        missing = [i for i, _ in hits if i not in found]
        if missing:
            rows = self._query(
                f"SELECT {_IMAGE_COLS} FROM images WHERE id IN ({','.join('?' * len(missing))})",
                tuple(missing),
            )
            by_id = {r[0]: _record(r) for r in rows}
            for i, dist in hits:
                if i in by_id:
                    rec = by_id[i]
                    found[i] = Match(rec, dist, bool(digest) and rec.digest == digest)
        return nearest_first(found.values(), limit)

    def locked(self, scope: str) -> AbstractContextManager[None]:
        with self._lock:
            lock = self._scope_locks.setdefault(scope, threading.RLock())

        @contextmanager
        def hold() -> Iterator[None]:
            with lock:
                yield

        return hold()

    def stats(self) -> dict[str, object]:
        by_status = dict(self._query("SELECT status, count(*) FROM images GROUP BY status"))
        scopes = self._query("SELECT scope, count(*) FROM images GROUP BY scope ORDER BY scope")
        quarantine = dict(self._query("SELECT state, count(*) FROM quarantine GROUP BY state"))
        size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal")
                   if os.path.exists(p))
        return {
            "backend": "sqlite",
            "url": self.url,
            "schema_version": SCHEMA_VERSION,
            "images": sum(by_status.values()),
            "by_status": by_status,
            "scopes": dict(scopes),
            "quarantine": quarantine,
            "bytes": size,
        }

    # -- quarantine journal
    def add_quarantine(self, entry: QuarantineEntry) -> QuarantineEntry:
        with self._tx() as db:
            cur = db.execute(
                f"INSERT INTO quarantine ({_QUAR_COLS}) VALUES (NULL,?,?,?,?,?,?,?,?,?,?)",
                (entry.image_id, entry.original_path, entry.quarantine_path, entry.matched_path,
                 entry.distance, entry.hash, entry.policy, entry.reason, entry.created,
                 entry.state),
            )
        return QuarantineEntry(**{**entry.__dict__, "id": cur.lastrowid})

    def update_quarantine(self, entry: QuarantineEntry) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE quarantine SET image_id=?, original_path=?, quarantine_path=?, "
                "matched_path=?, distance=?, hash=?, policy=?, reason=?, created=?, state=? "
                "WHERE id=?",
                (entry.image_id, entry.original_path, entry.quarantine_path, entry.matched_path,
                 entry.distance, entry.hash, entry.policy, entry.reason, entry.created,
                 entry.state, entry.id),
            )

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        rows = self._query(f"SELECT {_QUAR_COLS} FROM quarantine WHERE id = ?", (entry_id,))
        return _entry(rows[0]) if rows else None

    def list_quarantine(self, states: tuple[str, ...] | None = None) -> list[QuarantineEntry]:
        sql, args = f"SELECT {_QUAR_COLS} FROM quarantine", ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(states)
        return [_entry(r) for r in self._query(sql + " ORDER BY id", args)]
