"""`dedupd db`: schema migration and copying a dictionary between backends.

Copies go through the Store interface, so SQLite -> PostgreSQL, PostgreSQL -> SQLite
(and same-kind copies) are one code path: records stream out in pages and go in
batches (COPY on PostgreSQL, one transaction per batch on SQLite). Re-running a copy is
safe: records are matched by path and journal entries by (original path, quarantine
path, time); whatever the destination already has is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from dedupd.store.base import ImageRecord, Store, StoreError, open_store

BATCH = 5000


def check_url(url: str) -> str:
    """A store URL dedupd can open: a path, sqlite:///PATH or postgresql://..."""
    if "://" in url and not url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise StoreError(f"{url}: unsupported store (use a path, sqlite:///PATH or "
                         "postgresql://USER@HOST/DB)")
    return url


def copy_store(src: Store, dst: Store, progress: object | None = None) -> dict[str, int]:
    """Copy every image record and quarantine journal entry of src that dst lacks.

    Ids are the destination's own; journal entries that point at an image record are
    re-pointed at its copy. Returns counts of copied and skipped rows.
    """
    counts = {"images": 0, "images_skipped": 0, "quarantine": 0, "quarantine_skipped": 0}
    entries = src.list_quarantine()
    referenced = {e.image_id for e in entries if e.image_id is not None}
    new_id: dict[int, int] = {}  # source id -> destination id, for referenced records only
    batch: list[ImageRecord] = []

    def flush() -> None:
        present = dst.existing_paths([r.path for r in batch])
        fresh = [r for r in batch if r.path not in present]
        signatures = src.signatures([r.id for r in fresh])  # type: ignore[misc]
        copied = dst.insert_many([r.with_(id=None, signature=signatures.get(r.id))
                                  for r in fresh])
        for old, new in zip(fresh, copied, strict=True):
            if old.id in referenced:
                new_id[old.id] = new  # type: ignore[index]
        for old in batch:
            if old.path in present and old.id in referenced:
                kept = dst.get_by_path(old.path)
                if kept is not None:
                    new_id[old.id] = kept.id  # type: ignore[index,assignment]
        counts["images"] += len(fresh)
        counts["images_skipped"] += len(batch) - len(fresh)
        if progress is not None:
            progress.step(len(batch))  # type: ignore[attr-defined]
        batch.clear()

    for record in src.iter_records():
        batch.append(record)
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    have = {(e.original_path, e.quarantine_path, e.created) for e in dst.list_quarantine()}
    for entry in entries:
        if (entry.original_path, entry.quarantine_path, entry.created) in have:
            counts["quarantine_skipped"] += 1
            continue
        image_id = new_id.get(entry.image_id) if entry.image_id is not None else None
        dst.add_quarantine(replace(entry, id=None, image_id=image_id))
        counts["quarantine"] += 1
    return counts


def cmd_db(args: argparse.Namespace, config: object) -> int:
    from dedupd.cli import Progress

    index = config.index  # type: ignore[attr-defined]
    started = time.monotonic()
    if args.db_command == "migrate":
        store = open_store(index)  # opening migrates
        try:
            before, after = getattr(store, "migrated", (None, None))
            result: dict[str, object] = {"action": "migrate", "store": store.url,
                                         "from_version": before, "to_version": after}
        finally:
            store.close()
        text = (f"{result['store']}: schema version {after}"
                + (f" (migrated from {before})" if before != after else " (up to date)"))
    else:
        other = check_url(args.url)
        here = open_store(index)
        try:
            there = open_store(other)
        except StoreError:
            here.close()
            raise
        try:
            src, dst = (here, there) if args.db_command == "export" else (there, here)
            if src.url == dst.url:
                raise StoreError(f"{src.url}: source and destination are the same store")
            total = int(src.stats()["images"])  # type: ignore[call-overload]
            progress = Progress(total, args.db_command, enabled=None if not args.json else False)
            try:
                counts = copy_store(src, dst, progress)
            finally:
                progress.close()
            result = {"action": args.db_command, "from": src.url, "to": dst.url, **counts}
        finally:
            there.close()
            here.close()
        text = (f"{result['from']} -> {result['to']}: {counts['images']} images copied, "
                f"{counts['images_skipped']} already there; {counts['quarantine']} journal "
                f"entries copied, {counts['quarantine_skipped']} already there")
    result["seconds"] = round(time.monotonic() - started, 3)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0
