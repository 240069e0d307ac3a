"""`dedupd quarantine list|purge` and `dedupd restore`: the quarantine journal from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from dedupd.config import Config
from dedupd.quarantine import Quarantine, restore_and_report
from dedupd.store import QuarantineEntry, Store, open_store
from dedupd.store.base import DONE, UNRESOLVED


def _entry_json(e: QuarantineEntry) -> dict[str, object]:
    return asdict(e)


def cmd_quarantine(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config.index)
    try:
        q = Quarantine(store, config.quarantine_dir)
        if args.quarantine_command == "list" and getattr(args, "pending", False):
            return _list_pending(store, config, args.json)
        if args.quarantine_command == "list":
            entries = store.list_quarantine((DONE,))
            if args.json:
                json.dump([_entry_json(e) for e in entries], sys.stdout)
                sys.stdout.write("\n")
            else:
                for e in entries:
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
                    print(f"{e.id:>6}  {when}  d={e.distance:<2}  {e.original_path}\n"
                          f"        -> {e.quarantine_path}  (duplicate of {e.matched_path})")
                print(f"{len(entries)} quarantined", file=sys.stderr)
            return 0
        gone = q.purge(args.older_than, dry_run=args.dry_run)
        if args.json:
            json.dump({"purged": [_entry_json(e) for e in gone], "dry_run": args.dry_run},
                      sys.stdout)
            sys.stdout.write("\n")
        else:
            for e in gone:
                print(e.quarantine_path)
            verb = "would purge" if args.dry_run else "purged"
            print(f"{verb} {len(gone)} files", file=sys.stderr)
        return 0
    finally:
        store.close()


def _list_pending(store: Store, config: Config, as_json: bool) -> int:
    """Duplicates the policy would remove but that are still in place (quarantine failed,
    circuit breaker open), each with the copy it duplicates."""
    rows = []
    for rec in store.iter_records():
        if rec.status != UNRESOLVED:
            continue
        watch = config.watch_for(rec.path)
        distance = config.policy_for(watch).max_distance if watch else 0
        match = next((m for m in store.find_matches(rec.scope, rec.recipe, rec.hash, rec.digest,
                                                    distance, limit=1)), None)
        rows.append({"path": rec.path, "scope": rec.scope,
                     "matched_path": match.record.path if match else None,
                     "distance": match.distance if match else None})
    if as_json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
    else:
        for row in rows:
            print(f"{row['path']}  (duplicate of {row['matched_path']}, "
                  f"d={row['distance']})")
        print(f"{len(rows)} pending (retried at the next rescan, reload or start)",
              file=sys.stderr)
    return 0


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    store = open_store(config.index)
    try:
        q = Quarantine(store, config.quarantine_dir)
        from dedupd.events import setup_logging

        # A restore belongs in the service's log even when run from a shell: to journald
        # when the machine has one (`journalctl -t dedupd` shows it beside the service's).
        journald = os.path.exists("/run/systemd/journal/socket")
        setup_logging(args.log or ("journald" if journald else "auto"), "info")
        entry = q.find(args.target)  # errors: one line (JSON under --json) from cli.main
        back = restore_and_report(q, entry)
        if args.json:
            json.dump({"id": entry.id, "restored": str(back)}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(f"restored {back}")
        return 0
    finally:
        store.close()
