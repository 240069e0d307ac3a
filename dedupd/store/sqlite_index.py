"""The SQLite store's in-memory Hamming indexes, one per (scope, recipe): loaded on first
use, kept equal to the live rows by every write, and persisted as snapshots so that a
start with millions of records does not read them all through SELECT."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

import numpy as np

from dedupd.hashing import Recipe
from dedupd.store.base import LIVE_STATUSES, ImageRecord
from dedupd.store.hamming import HammingIndex

# Indexes smaller than this load from SQL in well under a second: no snapshot.
SNAPSHOT_MIN = 100_000


def in_chunks(values: list) -> Iterator[tuple[str, tuple]]:
    """("?,?,...", values) in slices of 500, for `x IN (...)` under SQLite's limit on
    bound parameters."""
    for start in range(0, len(values), 500):
        chunk = tuple(values[start:start + 500])
        yield ",".join("?" * len(chunk)), chunk


class IndexedRows:
    """The index half of SQLiteStore (a base class: it shares the connection and locks)."""

    path: str
    _db: sqlite3.Connection
    _lock: threading.RLock
    _checkpoint_lock: threading.Lock
    _indexes: dict[tuple[str, str], HammingIndex]
    _saved_at: dict[tuple[str, str], tuple[int, int]]  # (max id, log seq)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

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

    def maintain(self) -> None:
        self.checkpoint()

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
        for marks, chunk in in_chunks(changed):
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
        loaded = self._indexes.get(key)  # without the writer's lock: a lookup never waits
        if loaded is not None:
            return loaded
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
