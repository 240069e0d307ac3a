"""Command line: ``dedupd [--config PATH] COMMAND``. Exit 0 ok, 1 duplicate found, 2 error,
78 configuration error (EX_CONFIG: the service unit does not restart on it)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from dedupd import __version__
from dedupd.access import act_as_state_owner
from dedupd.cli.db import cmd_db
from dedupd.cli.output import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    CommandError,
    UsageError,
    fail,
)
from dedupd.cli.quarantine import cmd_quarantine, cmd_restore
from dedupd.cli.reload import cmd_reload
from dedupd.cli.review import add_arguments as add_review_arguments
from dedupd.cli.review import cmd_review
from dedupd.cli.run import cmd_demo, cmd_run
from dedupd.cli.scan import cmd_check, cmd_hash, cmd_scan
from dedupd.cli.stats import cmd_stats, cmd_validate
from dedupd.config import Config, ConfigError, load_config
from dedupd.decoder_messages import DECODER_MESSAGES
from dedupd.hashing import ALGOS, DECODES, SIZES
from dedupd.quarantine import QuarantineError
from dedupd.store import StoreError

# Commands that open the store or move files: run as root on the service's state, they
# act as its owner (dedupd.access).
STATEFUL_COMMANDS = ("run", "scan", "check", "stats", "quarantine", "restore", "review", "db")

DESCRIPTION = """\
dedupd keeps image datasets free of duplicates. It hashes images with a perceptual
difference hash (dHash), keeps the hashes in a persistent dictionary, and treats any
image within a policy's Hamming distance of a known one as a duplicate.
"""

EPILOG = """\
commands:
  run          watch the configured roots and apply their policies (the daemon)
  demo         run the daemon on a throwaway folder with generated images
  hash         print the dHash of image files
  scan         index existing images under PATHs and report duplicate groups
  check        is each FILE (or image under DIR) a duplicate of something indexed?
  stats        what the dictionary holds
  validate     check the configuration file and exit
  quarantine   list or purge quarantined duplicates
  restore      move a quarantined file back and allow it
  review       look at the quarantine in a browser (or write it as a static gallery)
  reload       make the running daemon reload its config and wait for its answer
  db           store maintenance (migrate, export, import)

exit status:
  0  success (check: the image is unique)
  1  check: the image is a duplicate; scan: duplicates were found
  2  error: bad arguments, unreadable input, store failure (run: cannot start)
  78 configuration error: the file is unreadable, not valid YAML, has a bad key or
     value, or names a path the service cannot write (EX_CONFIG; systemd does not
     restart the service on it)

files:
  /etc/dedupd/dedupd.yaml   configuration used when --config and $DEDUPD_CONFIG are unset
  $STATE_DIRECTORY or ~/.local/state/dedupd/index.sqlite   default embedded store
  Run as root on state owned by another user (the service's: the index, else the
  quarantine directory), commands that touch it act as that user, so nothing they
  create is left root-owned for the service.

environment:
  DEDUPD_CONFIG   configuration file when --config is not given
  NOTIFY_SOCKET   set by systemd; enables READY/STATUS/WATCHDOG notifications

See `dedupd COMMAND --help` for each command's options.
"""


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors become UsageError, so that main() prints them as JSON under --json."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    """--json at any level (`dedupd --json validate`, `dedupd validate --json`,
    `dedupd quarantine --json list`): a level that does not see it leaves it alone."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="JSON output, errors included")


def _days(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of days (0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dedupd", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", metavar="PATH",
                        help="YAML configuration (default: $DEDUPD_CONFIG, then "
                        "/etc/dedupd/dedupd.yaml, else built-in defaults)")
    parser.add_argument("--log", choices=("auto", "journald", "stderr", "json"),
                        help="where logs go (default: config log.mode, auto = journald under "
                        "systemd, stderr otherwise)")
    parser.add_argument("--json", action="store_true",
                        help="JSON output from every command, errors included (also accepted "
                        "after COMMAND); with run, JSON log lines (--log json)")
    parser.add_argument("--version", action="version", version=f"dedupd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Callable[[argparse.Namespace, Config], int], help: str,
            description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        _json_flag(p)
        return p

    p = add("hash", cmd_hash, "print the dHash of image files",
            "Print one line per FILE: the hash in lowercase hex, two spaces, the path.\n"
            "Unreadable files are reported on stderr and make the exit status 2.")
    p.add_argument("--algo", choices=ALGOS,
                   help="dhash (area resize, default) or dhash-seed (the seed's bilinear recipe)")
    p.add_argument("--size", type=int, choices=SIZES, help="hash grid size (8 = 64-bit)")
    p.add_argument("--decode", choices=DECODES,
                   help="fast (reduced JPEG decode, default) or full")
    p.add_argument("--workers", "-j", type=int, default=1, help="processes (default 1)")
    p.add_argument("files", nargs="+", metavar="FILE")

    p = add("scan", cmd_scan, "index existing images and apply their roots' policies",
            "Hash every image under PATHs on all cores and report duplicates grouped by the\n"
            "image they duplicate. Exit 1 if any.\n\n"
            "Files under a configured watch root get that root's policy, exactly as the\n"
            "daemon would apply it: new images are indexed, duplicates are quarantined,\n"
            "deleted or only logged as the policy says. Files outside every watch root are\n"
            "indexed (scope: the PATH given) and their duplicates reported, never moved.\n"
            "With --dry-run nothing is moved and the dictionary is not changed.")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="report only; the dictionary is not changed")
    p.add_argument("--workers", "-j", type=int, default=0,
                   help="processes (default: config workers, else all cores)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or directories (walked recursively, symlinks not followed)")

    p = add("check", cmd_check, "is each FILE a duplicate of an indexed image?",
            "Check files (directories are walked) against the dictionary without indexing\n"
            "them: per file, the nearest indexed images the second look confirms within the\n"
            "policy's distance (--json: one JSON object per file, JSON Lines).\n"
            "Exit 1 if any is a duplicate, else 2 if any could not be checked, else 0.")
    p.add_argument("--max-distance", "-d", type=int, help="Hamming threshold (default: policy)")
    p.add_argument("--scope", help="compare within this group (default: the watch of FILE, "
                   "else every group)")
    p.add_argument("--limit", type=int, default=5, help="matches to show (default 5)")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or directories")

    add("stats", cmd_stats, "show what the dictionary holds")
    add("validate", cmd_validate, "check the configuration and exit (78 if invalid)")

    p = add("run", cmd_run, "run the daemon",
            "Watch every configured root, hash images once fully written, and apply each\n"
            "root's policy. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config.")
    p = add("demo", cmd_demo,
            "run the daemon on a throwaway folder with generated images")
    p.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")

    p = add("reload", cmd_reload,
            "make the running daemon reload its config, and wait until it has",
            "For ExecReload=: the configuration is checked first (exit 78 if invalid,\n"
            "nothing sent), then SIGHUP goes to the daemon ($MAINPID, or --pid) and the\n"
            "command waits for its answer: 0 reloaded; 78 the daemon refused the new\n"
            "config (it keeps the old one; e.g. a root the unit's sandbox does not let it\n"
            "write: restart needed); 2 no answer.")
    p.add_argument("--pid", type=int, default=0,
                   help="the daemon's pid (default: $MAINPID, set by systemd)")
    p.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                   help="how long to wait for the daemon's answer (default 90)")

    p = add("quarantine", cmd_quarantine,
            "list or purge quarantined duplicates")
    qsub = p.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", help="list quarantined files")
    _json_flag(q)
    q.add_argument("--pending", action="store_true",
                   help="list duplicates that could not be removed yet (retried on rescan)")
    q = qsub.add_parser("purge", help="delete quarantined files older than DAYS")
    q.add_argument("--older-than", type=_days, required=True, metavar="DAYS")
    _json_flag(q)
    q.add_argument("--dry-run", "-n", action="store_true", help="only list what would go")

    p = add("restore", cmd_restore,
            "move a quarantined file back and mark it allowed")
    p.add_argument("target", metavar="ID|PATH")

    p = add("review", cmd_review,
            "review the quarantine in a browser, or write it as a static gallery",
            "Serve a small web page of the quarantine, newest first: each quarantined image\n"
            "beside the kept image it matched, with filters and actions (restore, confirm =\n"
            "delete now, not a duplicate). Loopback only unless --listen says otherwise.")
    add_review_arguments(p)

    p = add("db", cmd_db, "store maintenance",
            "Maintain the configured store (`index:`): create or upgrade its schema, or copy\n"
            "its records and quarantine journal to or from another store, e.g. SQLite to\n"
            "PostgreSQL when several hosts start sharing one dictionary. URL is a path,\n"
            "sqlite:///PATH or postgresql://USER@HOST/DB (TLS options in the DSN).")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    copy_help = (
        "Conflicts: records are matched by path. A path the destination already has is\n"
        "left exactly as it is there (the destination wins; nothing is overwritten), so\n"
        "an interrupted copy can simply be re-run and copies only what is missing.\n"
        "Quarantine journal entries are copied too (matched by original path, quarantine\n"
        "path and time) and re-pointed at the copied records. Record ids are renumbered.\n"
        "Stop the daemons writing to either store first, or re-run the copy afterwards.")
    d = dsub.add_parser("migrate", help="create or upgrade the schema",
                        description="Create the schema or upgrade it to this version of "
                        "dedupd (also done on every start; hosts starting at once take "
                        "turns).")
    _json_flag(d)
    d = dsub.add_parser("export", help="copy this store's records into URL",
                        description="Copy the configured store's image records and "
                        "quarantine journal into the store at\nURL (created if needed).\n\n"
                        + copy_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("url", metavar="URL", help="the destination store")
    _json_flag(d)
    d = dsub.add_parser("import", help="copy records from URL into this store",
                        description="Copy the image records and quarantine journal of the "
                        "store at URL into the\nconfigured store.\n\n" + copy_help,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("url", metavar="URL", help="the source store")
    _json_flag(d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    DECODER_MESSAGES.enabled = True  # libjpeg's words go with their file, not raw to fd 2
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args = parser.parse_args(argv)
        as_json = args.json
        return _run(args)
    except (CommandError, ConfigError, StoreError, QuarantineError) as exc:
        kind, status = _failure(exc)
        return fail(as_json, kind, str(exc), status)
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # a path the command was given or configured with, not a crash
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        return fail(as_json, "os", f"{where}{exc.strerror or exc}", EXIT_ERROR)
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    """The command, with its configuration, as the state's owner where it touches state."""
    if args.command == "run" and args.json:
        if args.log not in (None, "json"):
            raise UsageError(f"run --json means --log json; it contradicts --log {args.log}")
        args.log = "json"
    config = load_config(args.config)
    if args.command in STATEFUL_COMMANDS:
        act_as_state_owner(config)  # root must not leave files the service can't write
    return int(args.handler(args, config))


def _failure(exc: Exception) -> tuple[str, int]:
    """What a failure is called in its one-line error, and the exit status it gives."""
    if isinstance(exc, CommandError):  # UsageError included
        return exc.kind, exc.status
    if isinstance(exc, ConfigError):
        return "config", EXIT_CONFIG
    return ("store" if isinstance(exc, StoreError) else "quarantine"), EXIT_ERROR
