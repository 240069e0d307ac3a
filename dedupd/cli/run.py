"""`dedupd run` (the daemon) and `dedupd demo` (the daemon on a throwaway folder)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from dedupd.access import check_writable
from dedupd.cli.output import EXIT_ERROR, EXIT_OK, fields_of, print_json, print_line, print_note
from dedupd.config import Config, ConfigError
from dedupd.events import Event, emit, setup_logging
from dedupd.service import Notifier
from dedupd.store import StoreError


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    # Imported here: the daemon and watchdog cost every other command their import time.
    from dedupd.daemon import Daemon
    from dedupd.watcher import WatchError

    setup_logging(args.log or config.log.mode, config.log.level)
    if not config.watches:
        raise ConfigError(config.source, "watches", "nothing to watch (add at least one root)")
    check_writable(config)  # one clear line and EX_CONFIG, not a failure per file later
    notifier = Notifier()
    try:
        daemon = Daemon(config, config_path=args.config, notifier=notifier)
        daemon.handle_signals()
        daemon.start()
    except (WatchError, StoreError) as exc:
        emit(Event.STOPPED, f"cannot start: {exc}", reason=str(exc))
        notifier.status(f"failed: {exc}")
        notifier.flush()
        return EXIT_ERROR
    return daemon.run()


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    """The daemon on a throwaway folder (removed afterwards unless --keep)."""
    from dedupd.demo import run_demo

    base = Path(tempfile.mkdtemp(prefix="dedupd-demo-"))
    print_note(f"demo folder: {base}")
    try:
        result = run_demo(base, args.log or ("json" if args.json else "stderr"))
    finally:
        if args.keep:
            print_note(f"kept the demo folder: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print_json({"folder": str(base), "kept": result.kept,
                    "quarantined": [fields_of(e) for e in result.quarantined]})
        return EXIT_OK
    print_line("")
    print_line(f"{result.kept} images kept, {len(result.quarantined)} duplicates quarantined:")
    for e in result.quarantined:
        print_line(f"  {Path(e.original_path).relative_to(base)}  (distance {e.distance} from "
                   f"{Path(e.matched_path).relative_to(base)})")
    return EXIT_OK
