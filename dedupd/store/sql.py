"""What the two SQL backends share: the journal's and the rejections' columns, row
mappers and statements, and the reads that differ between SQLite and PostgreSQL only
in the placeholder (`?` or `%s`). A backend says how to read (`_query`) and how to
write one statement (`_write`); the rest is here once."""

from __future__ import annotations

from abc import abstractmethod

from dedupd.store.base import (
    STATUSES,
    ImageRecord,
    QuarantineEntry,
    QuarantineFilter,
    Rejection,
    Store,
    StoreStats,
    path_from_db,
    path_to_db,
)

QUAR_COLS = ("id, image_id, original_path, quarantine_path, matched_path, distance, hash, "
             "policy, reason, created, state, transform, low_information")
_QUAR_SET = ", ".join(f"{c}=%(m)s" for c in QUAR_COLS.split(", ")[1:])
_REJ_COLS = "path, file_size, mtime_ns, kind, reason, seen"


def entry_from_row(row: tuple) -> QuarantineEntry:
    """A journal entry from a row of QUAR_COLS."""
    (qid, image_id, orig, qpath, matched, dist, hexhash, policy, reason, created, state,
     transform, low_information) = row
    return QuarantineEntry(path_from_db(orig), path_from_db(qpath), path_from_db(matched), dist,
                           hexhash, policy, image_id, reason, created, state, qid, transform,
                           bool(low_information))


def entry_row(e: QuarantineEntry) -> tuple:
    """The journal columns after id, in QUAR_COLS order, as stored."""
    return (e.image_id, path_to_db(e.original_path), path_to_db(e.quarantine_path),
            path_to_db(e.matched_path), e.distance, e.hash, e.policy, e.reason, e.created,
            e.state, e.transform, e.low_information)


def insert_quarantine_sql(mark: str) -> str:
    """INSERT of a journal entry (entry_row's values), without its RETURNING."""
    cols = QUAR_COLS.removeprefix("id, ")
    return f"INSERT INTO quarantine ({cols}) VALUES ({', '.join([mark] * len(cols.split(',')))})"


def _rejection(row: tuple) -> Rejection:
    return Rejection(path_from_db(row[0]), *row[1:])


class SQLStore(Store):
    """The reads and simple writes both SQL backends answer with the same statements."""

    MARK: str  # the driver's placeholder
    IMAGE_SELECT: str  # the columns _image() maps
    BACKEND: str  # its name in stats
    SCHEMA_VERSION: int

    @abstractmethod
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of one read."""

    @abstractmethod
    def _write(self, sql: str, args: tuple, *, journal: bool = False) -> None:
        """One write statement in a transaction of its own; journal: durable before it
        returns (a file moves next)."""

    @staticmethod
    @abstractmethod
    def _image(row: tuple) -> ImageRecord:
        """A record from a row of IMAGE_SELECT."""

    @abstractmethod
    def _bytes(self) -> int:
        """The store's size on disk (for stats)."""

    # -- images
    def get(self, record_id: int) -> ImageRecord | None:
        rows = self._query(f"SELECT {self.IMAGE_SELECT} FROM images WHERE id = {self.MARK}",
                           (record_id,))
        return self._image(rows[0]) if rows else None

    def get_by_path(self, path: str) -> ImageRecord | None:
        rows = self._query(f"SELECT {self.IMAGE_SELECT} FROM images WHERE path = {self.MARK}",
                           (path_to_db(path),))
        return self._image(rows[0]) if rows else None

    def path_state(self, path: str) -> tuple[ImageRecord | None, bool]:
        """One statement for both (a new file's round trips to a shared store)."""
        m = self.MARK
        rows = self._query(
            f"SELECT {self.IMAGE_SELECT}, EXISTS (SELECT 1 FROM rejections "
            f"WHERE rejections.path = q.p) FROM (SELECT CAST({m} AS TEXT) AS p) AS q "
            "LEFT JOIN images ON images.path = q.p", (path_to_db(path),))
        row = rows[0]  # one row; the image's columns NULL (id first) when it has none
        return (self._image(row[:-1]) if row[0] is not None else None), bool(row[-1])

    def _path_range(self, lo: str, hi: str, limit: int, *, inclusive: bool
                    ) -> list[tuple[str, int, int, int, str]]:
        m = self.MARK  # both path columns compare in byte order (PostgreSQL: COLLATE "C")
        return self._query(  # type: ignore[return-value]
            "SELECT path, file_size, mtime_ns, id, status FROM images WHERE "
            f"path {'>=' if inclusive else '>'} {m} AND path < {m} ORDER BY path LIMIT {m}",
            (lo, hi, limit))

    def with_status(self, status: str, limit: int) -> tuple[list[ImageRecord], int]:
        """The status is written into the SQL (it is one of STATUSES): a partial index
        over unresolved records answers the pending gauge without a scan of millions."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        rows = self._query(f"SELECT {self.IMAGE_SELECT} FROM images WHERE status = "
                           f"'{status}' ORDER BY id DESC LIMIT {self.MARK}", (limit,))
        (total,) = self._query(f"SELECT count(*) FROM images WHERE status = '{status}'")[0]
        return [self._image(r) for r in rows], int(total)

    def stats(self) -> StoreStats:
        by_status = dict(self._query("SELECT status, count(*) FROM images GROUP BY status"))
        scopes = dict(self._query(
            "SELECT scope, count(*) FROM images GROUP BY scope ORDER BY scope"))
        quarantine = dict(self._query("SELECT state, count(*) FROM quarantine GROUP BY state"))
        return StoreStats(self.BACKEND, self.url, self.SCHEMA_VERSION, sum(by_status.values()),
                          by_status, scopes, quarantine, self._bytes())

    # -- quarantine journal
    def update_quarantine(self, e: QuarantineEntry) -> None:
        self._write(f"UPDATE quarantine SET {_QUAR_SET % {'m': self.MARK}} "
                    f"WHERE id={self.MARK}", (*entry_row(e), e.id), journal=True)

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        if not 0 < entry_id < 2**63:  # an id typed by a user: no row has one beyond 64 bits
            return None
        rows = self._query(f"SELECT {QUAR_COLS} FROM quarantine WHERE id = {self.MARK}",
                           (entry_id,))
        return entry_from_row(rows[0]) if rows else None

    def list_quarantine(self, states: tuple[str, ...] | None = None) -> list[QuarantineEntry]:
        sql, args = f"SELECT {QUAR_COLS} FROM quarantine", ()
        if states:
            sql += f" WHERE state IN ({','.join([self.MARK] * len(states))})"
            args = tuple(states)
        return [entry_from_row(r) for r in self._query(sql + " ORDER BY id", args)]

    def page_quarantine(self, where: QuarantineFilter, *, before: int | None = None,
                        after: int | None = None, limit: int = 50) -> list[QuarantineEntry]:
        return [entry_from_row(r) for r in self._query(*where.page_sql(QUAR_COLS, self.MARK, before,
                                                              after, limit))]

    def count_quarantine(self, where: QuarantineFilter) -> int:
        sql, args = where.where(self.MARK)
        return int(self._query(f"SELECT count(*) FROM quarantine WHERE {sql}", tuple(args))[0][0])

    # -- rejected files
    def get_rejection(self, path: str) -> Rejection | None:
        rows = self._query(f"SELECT {_REJ_COLS} FROM rejections WHERE path = {self.MARK}",
                           (path_to_db(path),))
        return _rejection(rows[0]) if rows else None

    def put_rejection(self, rejection: Rejection) -> None:
        self._write(
            f"INSERT INTO rejections ({_REJ_COLS}) VALUES ({','.join([self.MARK] * 6)}) "
            "ON CONFLICT (path) DO UPDATE SET file_size = excluded.file_size, "
            "mtime_ns = excluded.mtime_ns, kind = excluded.kind, reason = excluded.reason, "
            "seen = excluded.seen",
            (path_to_db(rejection.path), rejection.file_size, rejection.mtime_ns,
             rejection.kind, rejection.reason, rejection.seen))

    def forget_rejection(self, path: str) -> None:
        self._write(f"DELETE FROM rejections WHERE path = {self.MARK}", (path_to_db(path),))

    def rejections(self, prefix: str) -> list[Rejection]:
        base = path_to_db(prefix.rstrip("/") + "/")
        m = self.MARK
        return [_rejection(row) for row in self._query(
            f"SELECT {_REJ_COLS} FROM rejections WHERE path >= {m} AND path < {m}",
            (base, base[:-1] + "0"))]
