"""What the store keeps: records, matches, journal entries and rejections, their states,
and how a path of any bytes is written into a text column. Plain data, no I/O."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

KEPT, QUARANTINED, ALLOWED, DELETED = "kept", "quarantined", "allowed", "deleted"
# A duplicate the policy would remove but that could not be (quarantine failed, circuit
# breaker open): left in place, decided again when the cause may be gone.
UNRESOLVED = "unresolved"
STATUSES = (KEPT, QUARANTINED, ALLOWED, DELETED, UNRESOLVED)
# Records in these states are part of a dataset and count as "already seen".
LIVE_STATUSES = (KEPT, ALLOWED)
# Records whose file lies in a watched root (the rest are in quarantine or gone).
IN_ROOT_STATUSES = (KEPT, ALLOWED, UNRESOLVED)

# What a reconcile needs of a record, by name in its directory: (file_size, mtime_ns, id,
# status). A plain tuple: a reconcile reads millions of them.
Known = tuple[int, int, int, str]

# Quarantine journal states: intent is written before any rename (crash safety).
# `restoring` is the intent of a restore, `restored` its completion (file back in place).
PENDING, DONE, RESTORING, RESTORED = "pending", "done", "restoring", "restored"
PURGED, ROLLED_BACK = "purged", "rolled_back"


def path_to_db(path: str) -> str:
    """A path as the store keeps it. Paths are bytes: a name that is not UTF-8 arrives
    surrogate-escaped (os.fsdecode), which neither SQLite nor PostgreSQL text can hold.
    Each such byte is written \\xHH and a backslash is doubled: reversible, and
    character by character, so a directory's prefix stays a prefix (prefix scans)."""
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    return "".join("\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}"
                   if "\udc80" <= c <= "\udcff" else c for c in path)


_DB_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_from_db(stored: str) -> str:
    """The inverse of path_to_db: the str os.fsdecode would give for the path's bytes."""
    if "\\" not in stored:
        return stored
    return _DB_ESCAPE.sub(lambda m: "\\" if m[1] == "\\" else chr(0xDC00 + int(m[1][1:], 16)),
                          stored)


class StoreError(Exception):
    """The store cannot be used (unreachable, corrupt, wrong schema)."""


class RecordGone(StoreError):
    """update() of a record that is no longer there (forgotten meanwhile: its file
    vanished from where the record said): not an outage, the caller decides."""


class StoreMissing(StoreError):
    """open_store(create=False) of a store that does not exist yet: read-only commands
    report an empty dictionary instead of creating one."""


@dataclass(frozen=True)
class ImageRecord:
    scope: str  # watch group: only records of one scope are compared
    path: str
    recipe: str  # Recipe.key: only hashes of one recipe are compared
    hash: int
    digest: str
    file_size: int
    mtime_ns: int
    width: int
    height: int
    first_seen: float = field(default_factory=time.time)
    status: str = KEPT
    id: int | None = None
    # The confirming signature (dedupd.signature), written with the record and read back
    # only for candidates (Store.signatures): records read from a store carry None.
    signature: bytes | None = field(default=None, compare=False, repr=False)

    def with_(self, **changes: object) -> ImageRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Match:
    record: ImageRecord
    distance: int
    identical: bool  # same content digest: a byte-for-byte copy
    transform: str | None = None  # how the newcomer was turned to match (e.g. "hflip")


@dataclass(frozen=True)
class Lookup:
    """What a lookup found, and how far the backend's view reached when it looked
    (`horizon`: opaque to callers, handed back to claim())."""

    matches: list[Match]
    horizon: object = None


def nearest_first(matches: Iterable[Match], limit: int) -> list[Match]:
    """The find_matches order of every backend: distance, then byte-identical copies
    before look-alikes, then the oldest record (lowest id)."""
    return sorted(matches, key=lambda m: (m.distance, not m.identical, m.record.id))[:limit]


@dataclass(frozen=True)
class Rejection:
    """A file found unusable (kind, reason) as it was then (size, mtime): logged once,
    looked at again only when it changes."""

    path: str
    file_size: int
    mtime_ns: int
    kind: str
    reason: str
    seen: float = field(default_factory=time.time)


@dataclass(frozen=True)
class QuarantineEntry:
    original_path: str
    quarantine_path: str
    matched_path: str
    distance: int
    hash: str
    policy: str
    image_id: int | None = None
    reason: str = "duplicate"
    created: float = field(default_factory=time.time)
    state: str = PENDING
    id: int | None = None
    # How the file matched, for the review: the turn (e.g. "hflip", "rot90") that made it
    # match (Match.transform), and whether its hash alone says little (a flat image).
    transform: str | None = None
    low_information: bool = False


# The flags a review can filter the journal by, as SQL both backends read alike.
FLAGS = {"transform": "transform IS NOT NULL", "low_information": "low_information = TRUE"}


@dataclass(frozen=True)
class QuarantineFilter:
    """Which journal entries a review shows: states, and optionally one root (original
    paths under a directory), one policy, a distance range, a time range, and one flag
    (FLAGS: turned to match, or a low-information image)."""

    states: tuple[str, ...] = (DONE,)
    root: str | None = None
    policy: str | None = None
    min_distance: int | None = None
    max_distance: int | None = None
    since: float | None = None  # created at or after (Unix time)
    until: float | None = None  # created before
    flag: str | None = None  # "transform" or "low_information" (FLAGS)

    @property
    def narrows(self) -> bool:
        """A filter beyond the states: a review shows a selection, not all there is."""
        return self != QuarantineFilter(states=self.states)

    def matches(self, e: QuarantineEntry) -> bool:
        root = self.root.rstrip("/") + "/" if self.root else None
        return (e.state in self.states and (root is None or e.original_path.startswith(root))
                and self.policy in (None, e.policy)
                and (self.min_distance is None or e.distance >= self.min_distance)
                and (self.max_distance is None or e.distance <= self.max_distance)
                and (self.since is None or e.created >= self.since)
                and (self.until is None or e.created < self.until)
                and (self.flag != "transform" or e.transform is not None)
                and (self.flag != "low_information" or e.low_information))

    def where(self, mark: str) -> tuple[str, list[object]]:
        """The same test as SQL (`mark`: the backend's placeholder), with its arguments."""
        sql = [f"state IN ({','.join([mark] * len(self.states))})"]
        args: list[object] = list(self.states)
        if self.root:
            root = path_to_db(self.root.rstrip("/") + "/")  # as stored
            sql.append(f"substr(original_path, 1, CAST({mark} AS INTEGER)) = {mark}")
            args += [len(root), root]
        for cond, value in (("policy = ", self.policy), ("distance >= ", self.min_distance),
                            ("distance <= ", self.max_distance), ("created >= ", self.since),
                            ("created < ", self.until)):
            if value is not None:
                sql.append(f"{cond}{mark}")
                args.append(value)
        if self.flag is not None:
            sql.append(FLAGS[self.flag])  # KeyError: not a flag the journal has
        return " AND ".join(sql), args

    def page_sql(self, columns: str, mark: str, before: int | None, after: int | None,
                 limit: int) -> tuple[str, tuple[object, ...]]:
        """SELECT of a page of the journal, newest first, by keyset (id) so that the last
        page costs what the first does."""
        sql, args = self.where(mark)
        if before is not None:
            sql, args = f"{sql} AND id < {mark}", [*args, before]
        elif after is not None:  # the page just newer than `after`: ascending, then reversed
            inner = (f"SELECT {columns} FROM quarantine WHERE {sql} AND id > {mark} "
                     f"ORDER BY id LIMIT {mark}")
            return f"SELECT * FROM ({inner}) AS newer ORDER BY id DESC", (*args, after, limit)
        return (f"SELECT {columns} FROM quarantine WHERE {sql} ORDER BY id DESC LIMIT {mark}",
                (*args, limit))


@dataclass(frozen=True)
class StoreStats:
    """What a store holds, for `dedupd stats` and the copy's progress: records by
    status and by scope (watch group), journal entries by state, size on disk."""

    backend: str
    url: str
    schema_version: int
    images: int
    by_status: dict[str, int]
    scopes: dict[str, int]
    quarantine: dict[str, int]
    bytes: int

    def as_dict(self) -> dict[str, object]:
        """The fields in order, as `dedupd stats --json` prints them."""
        return asdict(self)
