"""`dedupd run` (the daemon) and `dedupd demo` (the daemon on a throwaway folder)."""

from __future__ import annotations

import argparse

from dedupd.access import check_writable
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
        return 2
    return daemon.run()


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from dedupd.demo import run_demo

    return run_demo(keep=args.keep, json_output=args.json, log_mode=args.log)
