"""`dedupd db migrate|export|import`: schema upgrades and copies between stores."""

from __future__ import annotations

import argparse
import os
import time

from dedupd.cli.output import EXIT_OK, Progress, print_result
from dedupd.config import Config
from dedupd.store import Store, StoreError, open_store, sqlite_file
from dedupd.store.copy import check_url, copy_store


def cmd_db(args: argparse.Namespace, config: Config) -> int:
    index = config.index
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
            if _same_store(src, dst):
                raise StoreError(f"{src.url}: source and destination are the same store")
            total = src.stats().images
            progress = Progress(total, args.db_command, enabled=None if not args.json else False)
            try:
                counts = copy_store(src, dst, progress.step)
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
    print_result(args.json, result, text)
    return EXIT_OK


def _same_store(a: Store, b: Store) -> bool:
    """One store under two names (sqlite:///x and sqlite:////x, a symlink to the file):
    copying it into itself would only re-read every row."""
    if a.url == b.url:
        return True
    fa, fb = sqlite_file(a.url), sqlite_file(b.url)
    return fa is not None and fb is not None and os.path.samefile(fa, fb)
