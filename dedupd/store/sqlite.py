"""Embedded hash dictionary: one SQLite file in WAL mode plus an in-memory Hamming index.

Durability: WAL with synchronous=NORMAL. A killed process never corrupts or loses a
committed transaction; a power cut may lose the last few commits, which start-up
reconciliation repairs from the disk (files are the truth, the index follows them).
"""

from __future__ import annotations

import contextlib
import functools
import glob
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
    QuarantineFilter,
    Rejection,
    Store,
    StoreError,
    StoreMissing,
    nearest_first,
    path_from_db,
    path_to_db,
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
)
SCHEMA_VERSION = len(MIGRATIONS)
# Indexes smaller than this load from SQL in well under a second: no snapshot.
SNAPSHOT_MIN = 100_000
ITER_PAGE = 5000


def _in_chunks(values: list) -> Iterator[tuple[str, tuple]]:
    """("?,?,...", values) in slices of 500, for `x IN (...)` under SQLite's limit on
    bound parameters."""
    for start in range(0, len(values), 500):
        chunk = tuple(values[start:start + 500])
        yield ",".join("?" * len(chunk)), chunk


@functools.lru_cache(maxsize=64)
def _hash_bytes(recipe: str) -> int:
    return Recipe.from_key(recipe).bits // 8


def _hash_blob(record: ImageRecord) -> bytes:
    return record.hash.to_bytes(_hash_bytes(record.recipe), "little")


def _record(row: tuple) -> ImageRecord:
    (rid, scope, path, recipe, blob, digest, size, mtime, w, h, seen, status) = row
    return ImageRecord(scope, path_from_db(path), recipe, bytes_to_hash(blob), digest, size,
                       mtime, w, h, seen, status, rid)


def _entry(row: tuple) -> QuarantineEntry:
    (qid, image_id, orig, qpath, matched, dist, hexhash, policy, reason, created, state) = row
    return QuarantineEntry(path_from_db(orig), path_from_db(qpath), path_from_db(matched), dist,
                           hexhash, policy, image_id, reason, created, state, qid)


def _entry_row(entry: QuarantineEntry) -> tuple:
    """The journal columns after id, in _QUAR_COLS order, as stored."""
    return (entry.image_id, path_to_db(entry.original_path), path_to_db(entry.quarantine_path),
            path_to_db(entry.matched_path), entry.distance, entry.hash, entry.policy,
            entry.reason, entry.created, entry.state)


class SQLiteStore(Store):
    """Store in one SQLite file; safe to share between threads of one process."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.url = f"sqlite://{self.path}"
        if not create and not os.path.exists(self.path):
            raise StoreMissing(f"{self.path}: no such index (run a scan or the daemon first)")
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
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
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
                self.checkpoint()
            finally:
                self._db.close()

    # -- persistence of the in-memory index. Loading 10M hashes through SELECT takes
    # ten seconds or more; a snapshot (ids + hashes as .npy arrays) loads in well under
    # one. A snapshot records the largest row id and the index_log position it covers:
    # on load, rows with a larger id are added and every id logged since is re-read, so
    # a stale snapshot (the daemon was killed) is still exact, just slower to catch up.

    def _snapshot_path(self, scope: str, recipe: str) -> str:
        tag = hashlib.sha1(f"{scope}\0{recipe}".encode()).hexdigest()[:16]
        return f"{self.path}.hamming-{tag}.npz"

    def _position(self) -> tuple[int, int]:
        """(largest row id, last index_log seq): what a snapshot taken now covers."""
        (max_id,) = self._db.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()
        (seq,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM index_log").fetchone()
        return int(max_id), int(seq)

    def checkpoint(self) -> None:
        """Save snapshots of loaded indexes that changed, then trim the log they cover.
        Files are written outside the store lock: writers wait only for the copy."""
        with self._checkpoint_lock:
            with self._lock:
                position = self._position()
                todo = [(key, index.state()) for key, index in self._indexes.items()
                        if self._saved_at.get(key) != position and len(index) >= SNAPSHOT_MIN]
            for key, state in todo:
                if self._write_snapshot(self._snapshot_path(*key), state, position):
                    self._saved_at[key] = position
            with self._lock:
                self._trim_log()

    def _write_snapshot(self, path: str, state: dict[str, np.ndarray],
                        position: tuple[int, int]) -> bool:
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **state, max_id=np.int64(position[0]), seq=np.int64(position[1]))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return True
        except OSError:  # a snapshot is an optimisation; never fail a close for it
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    def _trim_log(self) -> None:
        """Drop log entries that every snapshot on disk already covers."""
        covered = []
        for path in glob.glob(glob.escape(self.path) + ".hamming-*.npz"):
            try:
                with np.load(path) as snap:
                    covered.append(int(snap["seq"]))
            except (OSError, ValueError, KeyError):
                continue
        (last,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM index_log").fetchone()
        floor = min(covered, default=last)
        if floor > self._log_floor():
            with self._tx() as db:
                db.execute("DELETE FROM index_log WHERE seq <= ?", (floor,))
                db.execute("UPDATE meta SET value = ? WHERE key = 'log_floor'", (floor,))

    def _log_floor(self) -> int:
        return int(self._db.execute(
            "SELECT value FROM meta WHERE key = 'log_floor'").fetchone()[0])

    def _load_snapshot(self, scope: str, recipe: str) -> HammingIndex | None:
        """The index from its snapshot, caught up with later writes; None if unusable."""
        try:
            with np.load(self._snapshot_path(scope, recipe)) as snap:
                max_id, seq = int(snap["max_id"]), int(snap["seq"])
                if seq < self._log_floor():
                    return None  # the log that would bring it up to date is gone
                index = HammingIndex.from_state(
                    Recipe.from_key(recipe).bits,
                    {k: snap[k] for k in ("ids", "hashes", "alive", "tab_slot", "starts",
                                          "built")})
        except (OSError, ValueError, KeyError, EOFError):
            return None
        self._load_rows(scope, recipe, index, "id > ?", (max_id,))
        changed = [r[0] for r in self._db.execute(
            "SELECT DISTINCT image_id FROM index_log WHERE seq > ?", (seq,))]
        for image_id in changed:
            index.remove(image_id)
        for marks, chunk in _in_chunks(changed):
            self._load_rows(scope, recipe, index, f"id IN ({marks})", chunk)
        self._saved_at[(scope, recipe)] = (max_id, seq)
        return index

    def _load_rows(self, scope: str, recipe: str, index: HammingIndex, where: str,
                   args: tuple) -> None:
        """Add the live rows of (scope, recipe) matching `where` to index, in one bulk add
        (adding chunk by chunk would rebuild the tables again and again)."""
        cur = self._db.execute(
            f"SELECT id, hash FROM images WHERE {where} AND scope = ? AND recipe = ? "
            f"AND status IN ({','.join('?' * len(LIVE_STATUSES))})",
            (*args, scope, recipe, *LIVE_STATUSES),
        )
        # Chunks feed numpy without holding millions of row tuples at once.
        ids, hashes = [], []
        while rows := cur.fetchmany(200_000):
            ids.append(np.fromiter((r[0] for r in rows), np.int64, len(rows)))
            hashes.append(np.frombuffer(b"".join([r[1] for r in rows]), "<u8"))
        if ids:
            all_ids, all_hashes = np.concatenate(ids), np.concatenate(hashes)
            del ids, hashes  # the chunks: 160 MB at 10M rows, not needed through the build
            index.adopt(all_ids, all_hashes)

    def warm(self, scope: str, recipe: str) -> None:
        self._index(scope, recipe)

    def live_count(self, scope: str, recipe: str) -> int | None:
        loaded = self._indexes.get((scope, recipe))
        return len(loaded) if loaded is not None else None

    def _index(self, scope: str, recipe: str) -> HammingIndex:
        """The in-memory index of (scope, recipe), loaded on first use."""
        key = (scope, recipe)
        with self._lock:
            index = self._indexes.get(key)
            if index is None:
                index = self._load_snapshot(scope, recipe)
                if index is None:
                    index = HammingIndex(Recipe.from_key(recipe).bits)
                    self._load_rows(scope, recipe, index, "1", ())
                self._indexes[key] = index
            return index

    def _index_sync(self, old: ImageRecord | None, new: ImageRecord | None) -> None:
        """Keep loaded indexes equal to the live rows after an update or delete, and log
        the id so that snapshots can catch up."""
        record = old or new
        if record is None:
            return
        self._db.execute("INSERT INTO index_log (image_id) VALUES (?)", (record.id,))
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

    def _index_add(self, records: list[ImageRecord], ids: range, blobs: list[bytes]) -> None:
        """Add the live ones among newly inserted rows to the loaded indexes, in bulk."""
        if len(records) == 1:  # the daemon's case: one image at a time
            r = records[0]
            index = self._indexes.get((r.scope, r.recipe))
            if index is not None and r.status in LIVE_STATUSES:
                index.add(ids[0], r.hash)
            return
        groups: dict[tuple[str, str], list[int]] = {}
        for n, r in enumerate(records):
            if r.status in LIVE_STATUSES and (r.scope, r.recipe) in self._indexes:
                groups.setdefault((r.scope, r.recipe), []).append(n)
        for key, picks in groups.items():
            index = self._indexes[key]
            hashes = np.frombuffer(b"".join([blobs[n] for n in picks]), "<u8")
            index.add_many(np.asarray(ids, np.int64)[picks], hashes.reshape(len(picks), -1))

    def existing_paths(self, paths: list[str]) -> set[str]:
        found: set[str] = set()
        for marks, chunk in _in_chunks([path_to_db(p) for p in paths]):
            found.update(path_from_db(row[0]) for row in self._query(
                f"SELECT path FROM images WHERE path IN ({marks})", chunk))
        return found

    def get(self, record_id: int) -> ImageRecord | None:
        rows = self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (record_id,))
        return _record(rows[0]) if rows else None

    def get_by_path(self, path: str) -> ImageRecord | None:
        rows = self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE path = ?",
                           (path_to_db(path),))
        return _record(rows[0]) if rows else None

    def update(self, record: ImageRecord) -> None:
        with self._tx() as db:
            old = self.get(record.id)  # type: ignore[arg-type]
            if old is None:
                raise StoreError(f"no image record {record.id}")
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

    def _path_range(self, lo: str, hi: str, limit: int, *, inclusive: bool
                    ) -> list[tuple[str, int, int, int, str]]:
        return self._query(  # type: ignore[return-value]
            "SELECT path, file_size, mtime_ns, id, status FROM images WHERE "
            f"path {'>=' if inclusive else '>'} ? AND path < ? ORDER BY path LIMIT ?",
            (lo, hi, limit))

    def signatures(self, ids: list[int]) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        for marks, chunk in _in_chunks(ids):
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
        for marks, chunk in _in_chunks(list(hits)):
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
                _entry_row(entry))
        return QuarantineEntry(**{**entry.__dict__, "id": cur.lastrowid})

    def update_quarantine(self, entry: QuarantineEntry) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE quarantine SET image_id=?, original_path=?, quarantine_path=?, "
                "matched_path=?, distance=?, hash=?, policy=?, reason=?, created=?, state=? "
                "WHERE id=?", (*_entry_row(entry), entry.id))

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        rows = self._query(f"SELECT {_QUAR_COLS} FROM quarantine WHERE id = ?", (entry_id,))
        return _entry(rows[0]) if rows else None

    def list_quarantine(self, states: tuple[str, ...] | None = None) -> list[QuarantineEntry]:
        sql, args = f"SELECT {_QUAR_COLS} FROM quarantine", ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = tuple(states)
        return [_entry(r) for r in self._query(sql + " ORDER BY id", args)]

    def page_quarantine(self, where: QuarantineFilter, *, before: int | None = None,
                        after: int | None = None, limit: int = 50) -> list[QuarantineEntry]:
        return [_entry(r) for r in self._query(*where.page_sql(_QUAR_COLS, "?", before, after,
                                                               limit))]

    def with_status(self, status: str, limit: int) -> tuple[list[ImageRecord], int]:
        rows = self._query(f"SELECT {_IMAGE_COLS} FROM images WHERE status = ? "
                           "ORDER BY id DESC LIMIT ?", (status, limit))
        (total,) = self._query("SELECT count(*) FROM images WHERE status = ?", (status,))[0]
        return [_record(r) for r in rows], int(total)

    def count_quarantine(self, where: QuarantineFilter) -> int:
        sql, args = where.where("?")
        return int(self._query(f"SELECT count(*) FROM quarantine WHERE {sql}", tuple(args))[0][0])

    # -- rejected files
    def get_rejection(self, path: str) -> Rejection | None:
        rows = self._query("SELECT path, file_size, mtime_ns, kind, reason, seen FROM "
                           "rejections WHERE path = ?", (path_to_db(path),))
        return Rejection(path, *rows[0][1:]) if rows else None

    def put_rejection(self, rejection: Rejection) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO rejections VALUES (?,?,?,?,?,?)",
                       (path_to_db(rejection.path), rejection.file_size, rejection.mtime_ns,
                        rejection.kind, rejection.reason, rejection.seen))

    def forget_rejection(self, path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM rejections WHERE path = ?", (path_to_db(path),))

    def rejections(self, prefix: str) -> list[Rejection]:
        base = path_to_db(prefix.rstrip("/") + "/")
        rows = self._query("SELECT path, file_size, mtime_ns, kind, reason, seen FROM "
                           "rejections WHERE path > ? AND path < ?", (base, base[:-1] + "0"))
        return [Rejection(path_from_db(row[0]), *row[1:]) for row in rows]
