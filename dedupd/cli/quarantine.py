"""`dedupd quarantine list|purge` and `dedupd restore`: the quarantine journal from a shell.

Listing and purging read the store without creating it: on a fresh install there is
nothing quarantined, and a store created by root here would be one more thing to fix."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

from dedupd.cli.output import (
    EXIT_OK,
    fields_of,
    print_json,
    print_json_list,
    print_line,
    print_note,
    print_result,
)
from dedupd.config import Config
from dedupd.events import setup_logging
from dedupd.matching import duplicates_of_record
from dedupd.quarantine import Quarantine, restore_and_report
from dedupd.store import ImageRecord, QuarantineEntry, Store, StoreMissing, open_store
from dedupd.store.base import UNRESOLVED, QuarantineFilter

# Journal entries read per query by `quarantine list`: memory stays flat at 100k entries.
PAGE = 1000


def cmd_quarantine(args: argparse.Namespace, config: Config) -> int:
    try:
        store = open_store(config.index, create=False)
    except StoreMissing:  # nothing was ever quarantined
        store = None
    try:
        if args.quarantine_command == "list" and args.pending:
            _list_pending(store, config, args.json)
        elif args.quarantine_command == "list":
            _list(store, args.json)
        else:
            _purge(store, config, args.older_than, args.dry_run, args.json)
        return EXIT_OK
    finally:
        if store is not None:
            store.close()


def _entries(store: Store | None) -> Iterator[QuarantineEntry]:
    """Every quarantined entry, oldest first, a page at a time."""
    after = 0
    while store is not None:
        page = store.page_quarantine(QuarantineFilter(), after=after, limit=PAGE)
        if not page:
            return
        yield from reversed(page)  # a page comes newest first
        after = page[0].id or after


def _list(store: Store | None, as_json: bool) -> None:
    if as_json:
        print_json_list(fields_of(e) for e in _entries(store))
        return
    count = 0
    for e in _entries(store):
        count += 1
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        print_line(f"{e.id:>6}  {when}  d={e.distance:<2}  {e.original_path}")
        print_line(f"        -> {e.quarantine_path}  (duplicate of {e.matched_path})")
    print_note(f"{count} quarantined")


def _purge(store: Store | None, config: Config, days: float, dry_run: bool,
           as_json: bool) -> None:
    gone = [] if store is None else \
        Quarantine(store, config.quarantine_dir).purge(days, dry_run=dry_run)
    if as_json:
        print_json({"purged": [fields_of(e) for e in gone], "dry_run": dry_run})
        return
    for e in gone:
        print_line(e.quarantine_path)
    print_note(f"{'would purge' if dry_run else 'purged'} {len(gone)} files")


def _list_pending(store: Store | None, config: Config, as_json: bool) -> None:
    """Duplicates the policy would remove but that are still in place (quarantine failed,
    circuit breaker open), each with the copy it duplicates."""
    rows = [] if store is None else [_pending_row(store, config, rec)
                                     for rec in _unresolved(store)]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        print_line(f"{row['path']}  (duplicate of {row['matched_path']}, d={row['distance']})")
    print_note(f"{len(rows)} pending (the daemon retries them every "
               f"{config.unresolved_retry_seconds:g} s, and at a rescan, reload or start)")


def _unresolved(store: Store) -> list[ImageRecord]:
    """The unresolved records, oldest first (the store counts them, then reads them)."""
    _, total = store.with_status(UNRESOLVED, 0)
    found, _ = store.with_status(UNRESOLVED, total)
    return found[::-1]


def _pending_row(store: Store, config: Config, rec: ImageRecord) -> dict[str, Any]:
    watch = config.watch_for(rec.path)
    distance = config.policy_for(watch).max_distance if watch else 0
    match = next(iter(duplicates_of_record(store, rec, distance, limit=1)), None)
    return {"path": rec.path, "scope": rec.scope,
            "matched_path": match.record.path if match else None,
            "distance": match.distance if match else None}


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config.index, create=False)  # none yet: nothing to restore
    try:
        q = Quarantine(store, config.quarantine_dir)
        # A restore belongs in the service's log even when run from a shell: to journald
        # when the machine has one (`journalctl -t dedupd` shows it beside the service's).
        journald = os.path.exists("/run/systemd/journal/socket")
        setup_logging(args.log or ("journald" if journald else "auto"), "info")
        entry = q.find(args.target)  # errors: one line (JSON under --json) from cli.main
        back = restore_and_report(q, entry)
        print_result(args.json, {"id": entry.id, "restored": str(back)}, f"restored {back}")
        return EXIT_OK
    finally:
        store.close()
