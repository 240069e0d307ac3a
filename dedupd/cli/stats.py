"""`dedupd stats` and `validate`: what the dictionary holds, whether the config is good."""

from __future__ import annotations

import argparse

from dedupd.cli.output import EXIT_OK, print_json, print_line
from dedupd.config import Config, check_runnable
from dedupd.store import open_store


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    """Read-only: a dictionary that does not exist yet is an error, never created here."""
    store = open_store(config.index, create=False)
    try:
        stats = store.stats().as_dict()
    finally:
        store.close()
    if args.json:
        print_json(stats)
        return EXIT_OK
    for key, value in stats.items():
        label = key.replace("_", " ")
        if isinstance(value, dict):
            print_line(f"{label}:{'' if value else ' none'}")
            width = max(len(str(k)) for k in value) if value else 0
            for k, v in value.items():
                print_line(f"  {str(k):<{width}}  {v:>12,}" if isinstance(v, int)
                           else f"  {k}  {v}")
        elif key == "bytes" and isinstance(value, int):
            print_line(f"{label:<16}{value:,} ({value / 2**20:,.1f} MiB)")
        else:
            print_line(f"{label:<16}{value:,}" if isinstance(value, int) else f"{label:<16}{value}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    """The checks `run` makes before it starts, so that ok here means run will start."""
    check_runnable(config)
    watches = [{"path": str(w.path), "policy": w.policy, "group": w.scope,
                "recursive": w.recursive} for w in config.watches]
    if args.json:
        print_json({"config": config.source, "valid": True, "watches": watches,
                     "policies": sorted(config.policies), "index": config.index,
                     "quarantine_dir": str(config.quarantine_dir),
                     "rejected_dir": str(config.rejected_dir or "") or None})
    else:
        print_line(f"{config.source}: ok ({len(config.watches)} watches, "
             f"{len(config.policies)} policies)")
        for w in watches:  # relative paths are shown resolved (against the config's folder)
            print_line(f"  watch {w['path']}  policy {w['policy']}  group {w['group']}")
        print_line(f"  index {config.index}")
        print_line(f"  quarantine_dir {config.quarantine_dir}")
    return EXIT_OK


