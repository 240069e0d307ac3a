"""What the review shows and does, independent of HTTP: pages of the quarantine journal
as rows (the quarantined image beside the kept one it matched), the files a thumbnail
may be made of, and the actions, through the same code as the CLI's commands.

The client names entries by id only; every path comes from the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dedupd.config import Config
from dedupd.matching import duplicates_of_record
from dedupd.quarantine import Quarantine, QuarantineError, restore_and_report
from dedupd.signature import Signature
from dedupd.store import ImageRecord, QuarantineEntry, Store, StoreError
from dedupd.store.base import DONE, UNRESOLVED, QuarantineFilter

PAGE_SIZE = 50
ACTIONS = ("restore", "confirm", "not_duplicate")
SIDES = ("quarantined", "kept")
# The journal's flags (QuarantineFilter.flag) as the filter names them.
FLAG_LABELS = {"transform": "mirror image or rotation", "low_information": "low information"}


@dataclass(frozen=True)
class Side:
    """One of the two images of a pair, as the store knows it."""

    path: str
    known: bool  # the store has a record of it (else: no thumbnail)
    width: int | None = None
    height: int | None = None
    size: int | None = None
    digest: str | None = None

    @property
    def resolution(self) -> str:
        return f"{self.width}×{self.height}" if self.width else "?"


@dataclass(frozen=True)
class Row:
    entry: QuarantineEntry
    root: str
    quarantined: Side
    kept: Side

    @property
    def identical(self) -> bool:
        return bool(self.quarantined.digest) and self.quarantined.digest == self.kept.digest

    def short(self, path: str) -> str:
        """path below the entry's root (shown beside it), else the whole path."""
        prefix = self.root.rstrip("/") + "/"
        return shown(path[len(prefix):] if self.root and path.startswith(prefix) else path)

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.entry.created, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class PendingRow:
    """A duplicate the policy would remove but that is still in place (its move failed,
    or the circuit breaker held its root): retried by the daemon, shown here."""

    record: ImageRecord
    root: str
    kept: Side
    distance: int | None
    policy: str = ""

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.record.first_seen, UTC).strftime(
            "%Y-%m-%d %H:%M:%S")

    def as_entry(self, low_information: bool) -> QuarantineEntry:
        """The journal entry it would have had, for QuarantineFilter.matches: the same
        filters, tested the same way. How it matched (transform) is not recorded for an
        unresolved record, so a transform filter passes none."""
        return QuarantineEntry(self.record.path, "", self.kept.path, self.distance or 0, "",
                               self.policy, created=self.record.first_seen, state=DONE,
                               low_information=low_information)

    def short(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        return shown(path[len(prefix):] if self.root and path.startswith(prefix) else path)


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int  # entries matching the filter
    newer: int | None  # `after=` of the previous (newer) page, if any
    older: int | None  # `before=` of the next (older) page, if any


def shown(path: str) -> str:
    """A path as text for a page: bytes that are not UTF-8 (kept by surrogateescape)
    become U+FFFD instead of failing the page's encoding."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_day(text: str | None, end: bool = False) -> float | None:
    """YYYY-MM-DD (UTC) -> Unix time of its start, or of the next day's start if end."""
    if not text:
        return None
    day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    return day + 86400 if end else day


class Review:
    """The quarantine of one configured store, for the review page and the gallery."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store
        self.quarantine = Quarantine(store, config.quarantine_dir)

    def roots(self) -> list[str]:
        return [str(w.path) for w in self.config.watches]

    def policies(self) -> list[str]:
        return sorted(self.config.policies)

    def page(self, where: QuarantineFilter, *, before: int | None = None,
             after: int | None = None, limit: int = PAGE_SIZE) -> Page:
        entries = self.store.page_quarantine(where, before=before, after=after,
                                             limit=limit + 1)
        if after is not None and before is None:  # paging back: the extra one is newest
            more_newer = len(entries) > limit
            entries = entries[-limit:] if more_newer else entries
            more_older = True
        else:
            more_older = len(entries) > limit
            entries = entries[:limit]
            more_newer = before is not None
        rows = [self.row(e) for e in entries]
        newer = entries[0].id if entries and more_newer else None
        older = entries[-1].id if entries and more_older else None
        return Page(rows, self.store.count_quarantine(where), newer, older)

    def row(self, entry: QuarantineEntry) -> Row:
        q_rec = self.store.get(entry.image_id) if entry.image_id is not None else None
        if q_rec is not None and q_rec.path != entry.quarantine_path:
            q_rec = None  # the record moved on (restored): not this file any more
        k_rec = self.store.get_by_path(entry.matched_path)
        watch = self.config.watch_for(entry.original_path)

        def side(path: str, rec: object) -> Side:
            if rec is None:
                return Side(path, False)
            return Side(path, True, rec.width, rec.height, rec.file_size,  # type: ignore[attr-defined]
                        rec.digest)  # type: ignore[attr-defined]

        quarantined = side(entry.quarantine_path, q_rec)
        if q_rec is None and entry.state == DONE:  # journalled here: the store knows it
            quarantined = Side(entry.quarantine_path, True)
        return Row(entry, str(watch.path) if watch else "", quarantined,
                   side(entry.matched_path, k_rec))

    def pending(self, where: QuarantineFilter | None = None, limit: int = 4 * PAGE_SIZE
                ) -> tuple[list[PendingRow], int]:
        """The newest unresolved duplicates, each with the copy it duplicates, and how many
        there are. With `where`, only those it passes as their journal entry would (root,
        policy, distance, dates as first seen, flag), and how many pass: a gallery written
        with filters lists the unresolved ones they select, not the newest of all."""
        records, total = self.store.with_status(UNRESOLVED, limit)
        if where is None or not where.narrows:
            return [self.pending_row(r) for r in records], total
        if total > len(records):
            records, _ = self.store.with_status(UNRESOLVED, total)
        low = self._low_information(records) if where.flag == "low_information" else set()
        rows, passed = [], 0
        by_distance = (where.min_distance, where.max_distance) != (None, None)
        for record in records:
            row = self.pending_row(record)
            if row.distance is None and by_distance:
                continue  # its copy is gone: no distance to filter by
            if where.matches(row.as_entry(record.id in low)):
                passed += 1
                if len(rows) < limit:
                    rows.append(row)
        return rows, passed

    def _low_information(self, records: list[ImageRecord]) -> set[int]:
        """The ids of those whose stored signature says their hash says little (what
        made a quarantined one's entry low_information)."""
        stored = self.store.signatures([r.id for r in records if r.id is not None])
        return {i for i, data in stored.items()
                if (sig := Signature.from_bytes(data)) is not None and sig.low_information}

    def pending_row(self, record: ImageRecord) -> PendingRow:
        watch = self.config.watch_for(record.path)
        distance = self.config.policy_for(watch).max_distance if watch else 0
        match = next(iter(duplicates_of_record(self.store, record, distance, limit=1)), None)
        kept = (Side(match.record.path, True, match.record.width, match.record.height,
                     match.record.file_size, match.record.digest) if match
                else Side("", False))
        return PendingRow(record, str(watch.path) if watch else "", kept,
                          match.distance if match else None,
                          self.config.policy_for(watch).name if watch else "")

    def pending_thumbnail_path(self, record_id: int, side: str) -> str | None:
        """An unresolved record's own file, or the file it duplicates; None otherwise."""
        record = self.store.get(record_id)
        if record is None or record.status != UNRESOLVED or side not in SIDES:
            return None
        if side == "quarantined":  # the file that should have gone
            return record.path
        row = self.pending_row(record)
        return row.kept.path or None

    def thumbnail_path(self, entry_id: int, side: str) -> str | None:
        """The file a thumbnail of an entry's side may be made of: the quarantined file of
        a done entry, or the kept file if the store has its record. None otherwise."""
        entry = self.store.get_quarantine(entry_id)
        if entry is None or side not in SIDES:
            return None
        if side == "quarantined":
            return entry.quarantine_path if entry.state == DONE else None
        return entry.matched_path if self.store.get_by_path(entry.matched_path) else None

    def act(self, action: str, entry_id: int) -> str:
        """Carry out one action on one entry as the CLI would; returns what was done.
        Raises QuarantineError (one line) when it cannot be done."""
        if action not in ACTIONS:
            raise QuarantineError(f"unknown action {action!r}")
        entry = self.store.get_quarantine(entry_id)
        if entry is None:
            raise QuarantineError(f"no quarantine entry {entry_id}")
        try:
            if action == "confirm":
                self.quarantine.purge_entry(entry)
                return f"{entry_id}: purged {shown(Path(entry.quarantine_path).name)}"
            back = restore_and_report(self.quarantine, entry,
                                      not_a_duplicate=action == "not_duplicate")
        except OSError as exc:
            raise QuarantineError(f"{entry_id}: {exc.strerror or exc}") from None
        except StoreError as exc:
            raise QuarantineError(f"{entry_id}: store: {exc}") from None
        return f"{entry_id}: restored {shown(str(back))}"


def now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
