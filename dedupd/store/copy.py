"""Copying a dictionary between stores (`dedupd db export|import`).

Copies go through the Store interface, so SQLite -> PostgreSQL, PostgreSQL -> SQLite
(and same-kind copies) are one code path: records stream out in pages and go in
batches (COPY on PostgreSQL, one transaction per batch on SQLite). Re-running a copy is
safe: records are matched by path and journal entries by (original path, quarantine
path, time); whatever the destination already has is left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from dedupd.store import backend_of
from dedupd.store.base import ImageRecord, Store

BATCH = 5000


def check_url(url: str) -> str:
    """A store URL dedupd can open (StoreError naming the forms it knows otherwise)."""
    backend_of(url)
    return url


def copy_store(src: Store, dst: Store,
               progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Copy every image record and quarantine journal entry of src that dst lacks.

    Ids are the destination's own; journal entries that point at an image record are
    re-pointed at its copy. progress, if given, is called with the number of records
    looked at in each batch. Returns counts of copied and skipped rows.
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
            progress(len(batch))
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
