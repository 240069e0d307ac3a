"""The hash dictionary's interface: what the daemon and CLI may ask of any backend.

Backends (SQLite embedded, PostgreSQL shared) implement Store; callers never
see SQL. Nothing here knows about watching files or policies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

from dedupd.store.records import (  # re-exported: the interface's vocabulary
    ALLOWED,
    DELETED,
    DONE,
    IN_ROOT_STATUSES,
    KEPT,
    LIVE_STATUSES,
    PENDING,
    PURGED,
    QUARANTINED,
    RESTORED,
    RESTORING,
    ROLLED_BACK,
    STATUSES,
    UNRESOLVED,
    ImageRecord,
    Known,
    Lookup,
    Match,
    QuarantineEntry,
    QuarantineFilter,
    RecordGone,
    Rejection,
    StoreError,
    StoreMissing,
    StoreStats,
    nearest_first,
    path_from_db,
    path_to_db,
)

__all__ = ["ALLOWED", "DELETED", "DONE", "IN_ROOT_STATUSES", "ImageRecord", "KEPT", "Known",
           "LIVE_STATUSES", "Lookup", "Match", "PENDING", "PURGED", "QUARANTINED",
           "QuarantineEntry", "QuarantineFilter", "RESTORED", "RESTORING", "ROLLED_BACK",
           "RecordGone", "Rejection", "STATUSES", "Store", "StoreError", "StoreMissing",
           "StoreStats", "UNRESOLVED", "nearest_first",
           "path_from_db", "path_to_db"]


class Store(ABC):
    """Persistent hash dictionary with near-duplicate search.

    Larger than ~200 lines on purpose: it is the whole interface every backend answers
    (records, lookups, the journal, rejections) and the intents written once on top of
    it; splitting it would split one contract over several classes."""

    url: str
    migrated: tuple[int, int]  # (schema version found when opened, version now)

    @abstractmethod
    def close(self) -> None: ...

    # -- images
    @abstractmethod
    def insert(self, record: ImageRecord) -> ImageRecord:
        """Add a record (path must be new); returns it with its id."""

    def insert_many(self, records: list[ImageRecord]) -> list[int]:
        """Bulk insert (one transaction where the backend can); returns the new ids."""
        return [self.insert(r).id for r in records]  # type: ignore[misc]

    def existing_paths(self, paths: list[str]) -> set[str]:
        """Which of paths have a record (one query per batch where the backend can)."""
        return {p for p in paths if self.get_by_path(p) is not None}

    @abstractmethod
    def get(self, record_id: int) -> ImageRecord | None: ...

    @abstractmethod
    def get_by_path(self, path: str) -> ImageRecord | None: ...

    @abstractmethod
    def update(self, record: ImageRecord) -> None:
        """Rewrite every field of an existing record (by id), e.g. a new path or status."""

    @abstractmethod
    def delete(self, record_id: int) -> None: ...

    @abstractmethod
    def iter_records(self, scope: str | None = None, prefix: str | None = None
                     ) -> Iterator[ImageRecord]:
        """All records, optionally of one scope and/or with paths under a directory prefix."""

    def children(self, directory: str) -> tuple[dict[str, Known], list[str]]:
        """The records of a directory's direct children (name -> Known), and the names of
        its subdirectories that hold records.

        One reconcile step per directory: a few range queries in path order over the
        path index, jumping over each subdirectory's records instead of reading them
        (past "sub/" comes "sub0"), so the cost follows the directory's own size, not
        the size of the tree below it. The first query asks for few rows, and each
        next one for twice as many while they are all direct children: a directory of
        subdirectories wastes a few rows per subdirectory, one of files a few queries."""
        base = directory.rstrip("/") + "/"
        hi, start = base[:-1] + "0", len(base)
        files: dict[str, Known] = {}
        subdirs: list[str] = []
        lo, inclusive, limit = base, False, 16
        while True:
            rows = self._path_range(lo, hi, limit, inclusive=inclusive)
            for path, size, mtime_ns, rid, status in rows:
                name = path[start:]
                slash = name.find("/")
                if slash >= 0:
                    subdirs.append(name[:slash])
                    lo, inclusive, limit = base + name[:slash] + "0", True, 16
                    break
                files[name] = (size, mtime_ns, rid, status)
            else:
                if len(rows) < limit:
                    return files, subdirs
                lo, inclusive, limit = rows[-1][0], False, min(2 * limit, 4096)

    @abstractmethod
    def _path_range(self, lo: str, hi: str, limit: int, *, inclusive: bool
                    ) -> list[tuple[str, int, int, int, str]]:
        """(path, file_size, mtime_ns, id, status) of at most `limit` records with
        lo < path (lo <= path if inclusive) and path < hi, in byte order of paths."""

    @abstractmethod
    def signatures(self, ids: list[int]) -> dict[int, bytes]:
        """The stored signatures of these records (those that have one)."""

    @abstractmethod
    def find_matches(self, scope: str, recipe: str, hash: int, digest: str | None,
                     max_distance: int, limit: int = 10) -> list[Match]:
        """Live records within max_distance (and byte-identical ones), nearest first."""

    def lookup(self, scope: str, recipe: str, hash: int, digest: str | None,
               max_distance: int, limit: int = 10) -> Lookup:
        """find_matches without any lock, for a decision that claim() then confirms.
        A backend may answer from a copy that lags behind (the horizon says how far)."""
        return Lookup(self.find_matches(scope, recipe, hash, digest, max_distance, limit))

    def claim(self, record: ImageRecord, max_distance: int, seen: Lookup) -> list[Match]:
        """Insert `record` (new, live) unless a live record of its scope within
        max_distance, or with its digest, exists that `seen` did not report: then write
        nothing and return those. This is the one step serialised per group: two
        look-alikes claimed at the same instant, anywhere, cannot both succeed."""
        with self.locked(record.scope):
            known = {m.record.id for m in seen.matches}
            new = [m for m in self.find_matches(record.scope, record.recipe, record.hash,
                                                record.digest, max_distance, limit=8)
                   if m.record.id not in known]
            if not new:
                self.insert(record)
            return new

    def warm(self, scope: str, recipe: str) -> None:
        """Load whatever makes the first query of (scope, recipe) fast: the in-memory
        index (SQLite), this host's replica (PostgreSQL), else a cheap query."""
        self.find_matches(scope, recipe, 0, None, 0, limit=1)

    def live_count(self, scope: str, recipe: str) -> int | None:
        """How many live records (scope, recipe) holds, if the backend knows it without a
        query (its in-memory index or replica; for STATUS=, sent every few seconds)."""
        return None

    def settle(self, path: str, report: Callable[[], None], lost: Callable[[], None]
               ) -> None:
        """Call report() once the record claim() just wrote for `path` (on this thread)
        is durable; lost() instead if a crash took it (the file is then decided again).
        A store whose writes are durable when they return reports at once."""
        report()

    def drain(self) -> None:
        """Wait until every report handed to settle() has been said."""
        return None

    def maintain(self) -> None:
        """Upkeep the backend decides on and the owner schedules (the daemon, every few
        minutes, off the hot path): e.g. SQLite persists its in-memory indexes so that
        the next start is fast. May take seconds; never needed for correctness."""
        return None

    # -- intents: each takes the scope's lock itself, so that a caller never holds it
    # across its own logic (the only callers of locked() left decide under it).
    def forget(self, scope: str, path: str, gone: Callable[[], bool],
               statuses: tuple[str, ...] = IN_ROOT_STATUSES) -> ImageRecord | None:
        """Delete the record of `path` if it is in one of `statuses` and gone() still
        holds under the lock (a file re-created meanwhile keeps its record). Returns the
        deleted record, or None."""
        with self.locked(scope):
            rec = self.get_by_path(path)
            if rec is None or rec.status not in statuses or not gone():
                return None
            self.delete(rec.id)  # type: ignore[arg-type]
            return rec

    def repath(self, scope: str, src: str, dst: str) -> ImageRecord | None:
        """Move the record of `src` to `dst` (a rename seen by the watcher). A record
        `dst` already has goes: the rename replaced its file (kept, it stood for content
        no longer there, and `src`'s stale record then stood beside it: a later copy of
        `src`'s content was taken for that file moved, and kept). Returns the moved
        record, or None."""
        with self.locked(scope):
            rec = self.get_by_path(src)
            if rec is None:
                return None
            replaced = self.get_by_path(dst)
            if replaced is not None:
                self.delete(replaced.id)  # type: ignore[arg-type]
            moved = rec.with_(path=dst)
            self.update(moved)
            return moved

    def repath_tree(self, scope: str, src: str, dst: str,
                    statuses: tuple[str, ...] = IN_ROOT_STATUSES) -> int:
        """Move the records of `scope` under directory `src` to the same names under
        `dst` (a directory renamed), one record per lock hold; records of other scopes
        or statuses, records that moved meanwhile and names `dst` already has stay.
        Returns how many moved."""
        base, target = src.rstrip("/") + "/", dst.rstrip("/") + "/"
        moved = 0
        for rec in list(self.iter_records(prefix=src)):
            if rec.scope != scope or rec.status not in statuses:
                continue
            new_path = target + rec.path[len(base):]
            with self.locked(scope):
                now = self.get(rec.id)  # type: ignore[arg-type]
                if now is None or now.path != rec.path or now.status not in statuses or \
                        self.get_by_path(new_path) is not None:
                    continue
                self.update(now.with_(path=new_path))
                moved += 1
        return moved

    def prune_missing(self, vanished: Iterable[tuple[int, str]],
                      gone: Callable[[str], bool]) -> tuple[int, int]:
        """Delete the records (id, path as last seen) whose file is gone(path), checked
        under the record's scope lock. A record found at another path was moved (the
        pipeline matched the file under its new name) and stays. Returns (forgotten,
        moved)."""
        forgotten = moved = 0
        for rid, path in vanished:
            rec = self.get(rid)
            if rec is None:
                continue
            if rec.path != path:
                moved += 1
                continue
            with self.locked(rec.scope):
                again = self.get(rid)
                if again is not None and again.path == path and gone(path):
                    self.delete(rid)
                    forgotten += 1
        return forgotten, moved

    @abstractmethod
    def locked(self, scope: str) -> AbstractContextManager[None]:
        """Serialise check-then-insert within a scope (across threads, and hosts if shared)."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    def ping(self) -> None:
        """Raise StoreError unless the store answers right now (one try, no retries)."""
        self.get(0)

    # -- rejected files
    def path_state(self, path: str) -> tuple[ImageRecord | None, bool]:
        """get_by_path(path), and whether a rejection of it is stored."""
        return self.get_by_path(path), self.get_rejection(path) is not None

    @abstractmethod
    def get_rejection(self, path: str) -> Rejection | None: ...

    @abstractmethod
    def put_rejection(self, rejection: Rejection) -> None:
        """Insert or replace the rejection of rejection.path."""

    @abstractmethod
    def forget_rejection(self, path: str) -> None: ...

    @abstractmethod
    def rejections(self, prefix: str) -> list[Rejection]:
        """The rejections of paths under a directory (to drop those of vanished files)."""

    # -- quarantine journal
    @abstractmethod
    def add_quarantine(self, entry: QuarantineEntry) -> QuarantineEntry: ...

    @abstractmethod
    def update_quarantine(self, entry: QuarantineEntry) -> None: ...

    @abstractmethod
    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None: ...

    @abstractmethod
    def list_quarantine(self, states: tuple[str, ...] | None = None) -> list[QuarantineEntry]: ...

    def page_quarantine(self, where: QuarantineFilter, *, before: int | None = None,
                        after: int | None = None, limit: int = 50) -> list[QuarantineEntry]:
        """One page of matching entries, newest (highest id) first: those with ids below
        `before`, or the `limit` just above `after` (paging back). Backends answer with
        one indexed query, so a page stays fast at 100k entries."""
        entries = [e for e in self.list_quarantine(where.states) if where.matches(e)
                   and (before is None or e.id < before) and (after is None or e.id > after)]
        entries.sort(key=lambda e: e.id, reverse=True)  # type: ignore[arg-type, return-value]
        return entries[-limit:] if after is not None and before is None else entries[:limit]

    def with_status(self, status: str, limit: int) -> tuple[list[ImageRecord], int]:
        """Up to `limit` records in `status`, newest first, and how many there are (the
        review's unresolved duplicates, the pending-quarantines gauge)."""
        found = [r for r in self.iter_records() if r.status == status]
        found.sort(key=lambda r: r.id or 0, reverse=True)
        return found[:limit], len(found)

    def count_quarantine(self, where: QuarantineFilter) -> int:
        return sum(where.matches(e) for e in self.list_quarantine(where.states))
