"""Command line: ``dedupd [--config PATH] COMMAND``. Exit 0 ok, 1 duplicate found, 2 error,
78 configuration error (EX_CONFIG: the service unit does not restart on it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dedupd import __version__
from dedupd.config import Config, ConfigError, check_runnable, load_config
from dedupd.events import json_safe, printable
from dedupd.hashing import (
    ALGOS,
    DECODER_MESSAGES,
    DECODES,
    SIZES,
    ImageError,
    ImageHash,
    Recipe,
    hash_file,
    hash_to_hex,
)
from dedupd.quarantine import QuarantineError
from dedupd.store import ImageRecord, Match, StoreError, open_store
from dedupd.store.base import UNRESOLVED

EXIT_OK, EXIT_DUPLICATE, EXIT_ERROR = 0, 1, 2
# sysexits.h EX_CONFIG: a configuration error is permanent, so the unit lists it in
# RestartPreventExitStatus= and the service ends `failed` instead of restarting forever.
EXIT_CONFIG = 78
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


class UsageError(Exception):
    """Bad command line or input detected by a command; exit 2 with one line."""


# ---------------------------------------------------------------- output helpers


def _print_json(obj: Any) -> None:
    json.dump(json_safe(obj), sys.stdout, indent=None, sort_keys=False)
    sys.stdout.write("\n")


def _out(line: str) -> None:
    """One line on stdout; file names in it escaped (a newline in a name stays inside)."""
    print(printable(line))


def _err(message: str) -> None:
    print(f"dedupd: {printable(message)}", file=sys.stderr)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                             f"{rate:,.0f}/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# ---------------------------------------------------------------- hashing in parallel


@dataclass(frozen=True)
class HashOutcome:
    path: str
    result: ImageHash | None
    error: ImageError | None
    mtime_ns: int


def hash_one(job: tuple[str, Recipe, int, bool]) -> HashOutcome:
    """Process-pool entry point: never raises for bad input."""
    path, recipe, max_pixels, digest = job
    try:
        mtime = os.stat(path).st_mtime_ns
        # `dedupd hash` (digest=False) prints hashes: it needs no signature either.
        return HashOutcome(path, hash_file(path, recipe, max_pixels, digest=digest,
                                           second_look=digest), None, mtime)
    except ImageError as exc:
        return HashOutcome(path, None, exc, 0)
    except OSError as exc:
        return HashOutcome(path, None, ImageError("unreadable", exc.strerror or str(exc)), 0)


def hash_many(paths: Sequence[str], recipe: Recipe, max_pixels: int, workers: int,
              *, digest: bool = True) -> Iterator[HashOutcome]:
    """Hash paths on `workers` processes, yielding outcomes in input order."""
    jobs = ((p, recipe, max_pixels, digest) for p in paths)
    if workers <= 1 or len(paths) < 8:
        yield from map(hash_one, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor  # costs 15 ms: only when used

    chunk = max(1, min(64, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(hash_one, jobs, chunksize=chunk)


def default_workers(config: Config) -> int:
    return config.workers or len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- commands


def _recipe_from_args(args: argparse.Namespace, config: Config) -> Recipe:
    return Recipe(
        algo=args.algo or config.recipe.algo,
        size=args.size or config.recipe.size,
        decode=args.decode or config.recipe.decode,
    )


def cmd_hash(args: argparse.Namespace, config: Config) -> int:
    recipe = _recipe_from_args(args, config)
    status = EXIT_OK
    out = []
    # The digest is printed only in JSON; plain output skips its cost.
    for o in hash_many(args.files, recipe, config.max_pixels, args.workers or 1,
                       digest=args.json):
        if o.result is not None:
            if args.json:
                out.append({"path": o.path, "hash": o.result.hex, "recipe": recipe.key,
                            "width": o.result.width, "height": o.result.height,
                            "digest": o.result.digest, "format": o.result.format,
                            "warnings": list(o.result.warnings)})
            else:
                _out(f"{o.result.hex}  {o.path}")
                _warn_decoded(o.path, o.result.warnings)
        else:
            assert o.error is not None
            status = EXIT_ERROR
            if args.json:
                out.append({"path": o.path, "error": o.error.kind, "reason": o.error.reason})
            else:
                _err(f"{o.path}: {o.error.kind}: {o.error.reason}")
    if args.json:
        _print_json(out)
    return status


def _warn_decoded(path: str, warnings: Sequence[str]) -> None:
    """What the decoder said about an image it still decoded, on one line with the path."""
    if warnings:
        _err(f"{path}: warning: decoded with complaints (hashed anyway): {'; '.join(warnings)}")


def iter_image_files(roots: Iterable[Path], config: Config) -> Iterator[Path]:
    """Regular image files under roots; never follows symlinks, skips ignored names."""
    from fnmatch import fnmatch

    exts = {e for p in config.policies.values() for e in p.extensions}
    for root in roots:
        if not root.is_dir():  # a file named on the command line: hashed, or said why not
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames
                                 if not any(fnmatch(d, pat) for pat in config.ignore))
            for name in sorted(filenames):
                if any(fnmatch(name, pat) for pat in config.ignore):
                    continue
                if name.rsplit(".", 1)[-1].lower() not in exts:
                    continue
                path = Path(dirpath, name)
                if path.is_symlink():
                    continue
                yield path


def _scope_and_distance(config: Config, path: Path, fallback_scope: str) -> tuple[str, int, str]:
    watch = config.watch_for(path)
    if watch is None:
        return fallback_scope, config.policies["default"].max_distance, "default"
    policy = config.policy_for(watch)
    return watch.scope, policy.max_distance, policy.name


def _record_from(o: HashOutcome, scope: str) -> ImageRecord:
    r = o.result
    assert r is not None
    return ImageRecord(scope=scope, path=o.path, recipe=r.recipe.key, hash=r.hash,
                       digest=r.digest, file_size=r.file_size, mtime_ns=o.mtime_ns,
                       width=r.width, height=r.height,
                       signature=r.signature.to_bytes() if r.signature else None)


def _match_json(m: Match, size: int) -> dict[str, Any]:
    out = {"path": m.record.path, "distance": m.distance, "identical": m.identical,
           "hash": hash_to_hex(m.record.hash, size), "id": m.record.id,
           "status": m.record.status}
    if m.transform is not None:
        out["transform"] = m.transform
    return out


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    """Hash on all cores; apply the root's policy to files under a configured watch root
    (exactly as the daemon would), index and report everything else."""
    roots = [Path(p).resolve() for p in args.paths]
    for r in roots:
        if not r.exists():
            raise UsageError(f"{r}: no such file or directory")
    files = [str(p) for p in iter_image_files(roots, config)]
    _scan_logging(args, config)
    store = open_store(config.index)
    recipe = config.recipe
    workers = args.workers or default_workers(config)
    progress = Progress(len(files), "scan", enabled=None if not args.json else False)
    counts = {"files": len(files), "indexed": 0, "known": 0, "duplicates": 0,
              "quarantined": 0, "deleted": 0, "errors": 0}
    groups: dict[str, list[dict[str, Any]]] = {}
    errors: list[dict[str, str]] = []
    warned: list[dict[str, Any]] = []  # decoded, with the decoder's complaints
    pending: list[ImageRecord] = []
    started = time.monotonic()
    from dedupd.pipeline import Pipeline, find_duplicates
    from dedupd.policy import wanted
    from dedupd.signature import Signature, confirms
    from dedupd.store.hamming import HammingIndex

    pipeline = Pipeline(config, store)
    pipeline.breaker_until = "the end of this scan"
    # Outside the watch roots, inserts go to the store in batches of 500, so images this
    # run has indexed (or, in a dry run, would have) are also matched against an index
    # of their own.
    seen_index: dict[str, HammingIndex] = {}
    seen: dict[int, ImageRecord] = {}

    def flush() -> None:
        if pending:
            store.insert_many(pending)
            pending.clear()

    def report(original: str, path: str, match: Match, **more: Any) -> None:
        counts["duplicates"] += 1
        groups.setdefault(original, []).append(
            {"path": path, "distance": match.distance, "identical": match.identical, **more})

    try:
        for o in hash_many(files, recipe, config.max_pixels, workers):
            progress.step()
            if o.error is not None:
                counts["errors"] += 1
                errors.append({"path": o.path, "error": o.error.kind, "reason": o.error.reason})
                continue
            if o.result.warnings:  # type: ignore[union-attr]
                warned.append({"path": o.path, "warnings": list(o.result.warnings)})  # type: ignore[union-attr]
            path = Path(o.path)
            known = store.get_by_path(o.path)
            if known is not None and known.digest == o.result.digest \
                    and known.recipe == recipe.key \
                    and known.status != UNRESOLVED:  # type: ignore[union-attr]
                counts["known"] += 1
                continue
            watch = config.watch_for(path)
            if watch is not None and not args.dry_run:
                if not wanted(config.policy_for(watch), str(path.relative_to(watch.path))):
                    continue
                # Found by a scan: keep: first goes by mtime, whichever hashed first.
                done = pipeline.ingest(path, watch, o.result, o.mtime_ns,  # type: ignore[arg-type]
                                       known, arrival=o.mtime_ns / 1e9, queued=started)
                if done is not None and done.match is not None:
                    winner = o.path if done.loser != o.path else done.match.record.path
                    report(winner, done.loser, done.match,  # type: ignore[arg-type]
                           action=done.action, moved_to=done.moved_to)
                    counts["quarantined"] += done.moved_to is not None
                    counts["deleted"] += done.action == "delete"
                counts["indexed"] += done is not None and done.accepted
                continue
            fallback = str(next(r for r in roots if r == path or r in path.parents))
            scope, max_distance, _policy = _scope_and_distance(config, path, fallback)
            record = _record_from(o, scope)
            matches = find_duplicates(store, scope, o.result, max_distance,  # type: ignore[arg-type]
                                      exclude=o.path, limit=1)
            idx = seen_index.get(scope)
            if idx is None:
                idx = seen_index[scope] = HammingIndex(recipe.bits)
            if not matches:
                for rid, distance in idx.query(record.hash, max_distance, 32):
                    prior = seen[rid]
                    same = prior.digest == record.digest
                    theirs = Signature.from_bytes(prior.signature or b"")
                    mine = o.result.signature  # type: ignore[union-attr]
                    if same or mine is None or theirs is None \
                            or confirms(mine, theirs, max_distance):
                        matches = [Match(prior, distance, same)]
                        break
            if matches:
                report(matches[0].record.path, o.path, matches[0])
                continue
            if args.dry_run or known is None:
                local = record.with_(id=len(seen) + 1)
                seen[local.id] = local  # type: ignore[index]
                idx.add(local.id, local.hash)  # type: ignore[arg-type]
            if not args.dry_run and known is None:
                pending.append(record)
                counts["indexed"] += 1
                if len(pending) >= 500:
                    flush()
            elif not args.dry_run:  # changed, or hashed with another recipe: re-hashed
                store.update(record.with_(id=known.id, first_seen=known.first_seen,
                                          status=known.status))
                counts["indexed"] += 1
        flush()
    finally:
        progress.close()
        store.close()
    elapsed = time.monotonic() - started
    summary = {**counts, "dry_run": args.dry_run, "seconds": round(elapsed, 3),
               "workers": workers,
               "groups": [{"original": k, "duplicates": v} for k, v in groups.items()],
               "errors_detail": errors, "warnings_detail": warned}
    if args.json:
        _print_json(summary)
    else:
        for original, dups in groups.items():
            _out(original)
            for d in dups:
                done = f"  -> {d['moved_to']}" if d.get("moved_to") else \
                    "  (deleted)" if d.get("action") == "delete" else ""
                _out(f"  {d['distance']:>3}  {d['path']}{done}")
        for w in warned:
            _warn_decoded(w["path"], w["warnings"])
        for e in errors:
            _err(f"{e['path']}: {e['error']}: {e['reason']}")
        rate = len(files) / elapsed if elapsed > 0 else 0.0
        print(f"{counts['files']} files, {counts['indexed']} indexed, {counts['known']} already "
              f"known, {counts['duplicates']} duplicates ({counts['quarantined']} quarantined, "
              f"{counts['deleted']} deleted), {counts['errors']} errors in {elapsed:.1f} s "
              f"({rate:,.0f}/s){' [dry run]' if args.dry_run else ''}", file=sys.stderr)
    if counts["errors"]:  # some files were not looked at: not a clean result either way
        return EXIT_ERROR
    return EXIT_DUPLICATE if counts["duplicates"] else EXIT_OK


def _scan_logging(args: argparse.Namespace, config: Config) -> None:
    """Decisions a scan takes are events like the daemon's; on a terminal the per-image
    'accepted' lines would drown the report, so stderr shows notices and worse."""
    from dedupd.events import resolve_mode, setup_logging

    mode = resolve_mode(args.log or config.log.mode)
    level = config.log.level
    if mode == "stderr" and level in ("debug", "info"):
        level = "notice"
    setup_logging(mode, level)


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Each FILE (directories walked, as scan does) against the dictionary, indexing
    nothing: one result per file, JSON Lines with --json. Exit 1 if any is a duplicate,
    else 2 if any could not be checked, else 0."""
    from dedupd.pipeline import find_duplicates

    store = open_store(config.index)
    all_scopes: list[str] | None = None
    duplicates = errors = 0

    def error(path: Path, kind: str, reason: str) -> None:
        nonlocal errors
        errors += 1
        if args.json:
            _print_json({"path": str(path), "error": kind, "reason": reason})
        else:
            _err(f"{path}: {kind}: {reason}")

    try:
        for root in (Path(f).resolve() for f in args.files):
            # A named file is checked whatever it is (a missing one, a FIFO: the same
            # one-line error as `hash`); a directory is walked.
            for path in iter_image_files([root], config) if root.is_dir() else [root]:
                outcome = hash_one((str(path), config.recipe, config.max_pixels, True))
                if outcome.error is not None:
                    error(path, outcome.error.kind, outcome.error.reason)
                    continue
                result = outcome.result
                assert result is not None
                if not args.json:
                    _warn_decoded(str(path), result.warnings)
                watch = config.watch_for(path)
                policy = config.policy_for(watch) if watch else config.policies["default"]
                if args.scope:
                    scopes = [args.scope]
                elif watch is not None:
                    scopes = [watch.scope]
                else:
                    if all_scopes is None:
                        all_scopes = list(store.stats()["scopes"])  # type: ignore[call-overload]
                    scopes = all_scopes
                max_distance = policy.max_distance if args.max_distance is None \
                    else args.max_distance
                matches: list[Match] = []
                for scope in scopes:
                    matches += find_duplicates(store, scope, result, max_distance,
                                               flips=policy.match_flips_rotations,
                                               exclude=str(path), limit=args.limit)
                matches.sort(key=lambda m: (m.distance, not m.identical))
                matches = matches[: args.limit]
                duplicates += bool(matches)
                _check_report(args, path, result, max_distance, matches, config.recipe.size)
    finally:
        store.close()
    if duplicates:
        return EXIT_DUPLICATE
    return EXIT_ERROR if errors else EXIT_OK


def _check_report(args: argparse.Namespace, path: Path, result: ImageHash, max_distance: int,
                  matches: list[Match], size: int) -> None:
    low = result.low_information
    if args.json:
        _print_json({"path": str(path), "hash": result.hex, "max_distance": max_distance,
                     "duplicate": bool(matches), "low_information": low,
                     "warnings": list(result.warnings),
                     "matches": [_match_json(m, size) for m in matches]})
        return
    note = "  (low_information)" if low else ""
    if not matches:
        _out(f"unique  {path}{note}")
        return
    _out(f"duplicate  {path}{note}")
    for m in matches:
        extra = "  (identical)" if m.identical else f"  ({m.transform})" if m.transform else ""
        _out(f"  {m.distance:>3}  {m.record.path}{extra}")


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    """Read-only: a dictionary that does not exist yet is an error, never created here."""
    store = open_store(config.index, create=False)
    try:
        stats = store.stats()
    finally:
        store.close()
    if args.json:
        _print_json(stats)
        return EXIT_OK
    for key, value in stats.items():
        label = key.replace("_", " ")
        if isinstance(value, dict):
            _out(f"{label}:{'' if value else ' none'}")
            width = max(len(str(k)) for k in value) if value else 0
            for k, v in value.items():
                _out(f"  {str(k):<{width}}  {v:>12,}" if isinstance(v, int) else f"  {k}  {v}")
        elif key == "bytes" and isinstance(value, int):
            _out(f"{label:<16}{value:,} ({value / 2**20:,.1f} MiB)")
        else:
            _out(f"{label:<16}{value:,}" if isinstance(value, int) else f"{label:<16}{value}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    """The checks `run` makes before it starts, so that ok here means run will start."""
    check_runnable(config)
    watches = [{"path": str(w.path), "policy": w.policy, "group": w.scope,
                "recursive": w.recursive} for w in config.watches]
    if args.json:
        _print_json({"config": config.source, "valid": True, "watches": watches,
                     "policies": sorted(config.policies), "index": config.index,
                     "quarantine_dir": str(config.quarantine_dir),
                     "rejected_dir": str(config.rejected_dir or "") or None})
    else:
        _out(f"{config.source}: ok ({len(config.watches)} watches, "
             f"{len(config.policies)} policies)")
        for w in watches:  # relative paths are shown resolved (against the config's folder)
            _out(f"  watch {w['path']}  policy {w['policy']}  group {w['group']}")
        _out(f"  index {config.index}")
        _out(f"  quarantine_dir {config.quarantine_dir}")
    return EXIT_OK


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace, Config], int]:
    """Commands whose code lives with its concern (daemon, quarantine, db)."""

    def run(args: argparse.Namespace, config: Config) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args, config))

    return run


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """Usage errors become UsageError, so that main() prints them as JSON under --json."""

    def error(self, message: str) -> Any:  # type: ignore[override]
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

    p = add("run", _lazy("dedupd.daemon", "cmd_run"), "run the daemon",
            "Watch every configured root, hash images once fully written, and apply each\n"
            "root's policy. SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config.")
    p = add("demo", _lazy("dedupd.daemon", "cmd_demo"),
            "run the daemon on a throwaway folder with generated images")
    p.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")

    p = add("reload", _lazy("dedupd.service", "cmd_reload"),
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

    p = add("quarantine", _lazy("dedupd.quarantine", "cmd_quarantine"),
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

    p = add("restore", _lazy("dedupd.quarantine", "cmd_restore"),
            "move a quarantined file back and mark it allowed")
    p.add_argument("target", metavar="ID|PATH")

    p = add("review", _lazy("dedupd.review", "cmd_review"),
            "review the quarantine in a browser, or write it as a static gallery",
            "Serve a small web page of the quarantine, newest first: each quarantined image\n"
            "beside the kept image it matched, with filters and actions (restore, confirm =\n"
            "delete now, not a duplicate). Loopback only unless --listen says otherwise.")
    from dedupd.review import add_arguments as add_review_arguments

    add_review_arguments(p)

    p = add("db", _lazy("dedupd.store.admin", "cmd_db"), "store maintenance",
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
        if args.command == "run" and args.json:
            if args.log not in (None, "json"):
                raise UsageError(f"run --json means --log json; it contradicts --log {args.log}")
            args.log = "json"
        config = load_config(args.config)
        if args.command in STATEFUL_COMMANDS:
            from dedupd.access import act_as_state_owner

            act_as_state_owner(config)  # root must not leave files the service can't write
        return args.handler(args, config)
    except ConfigError as exc:
        return _fail(as_json, "config", str(exc), EXIT_CONFIG)
    except UsageError as exc:
        return _fail(as_json, "usage", str(exc), EXIT_ERROR)
    except StoreError as exc:
        return _fail(as_json, "store", str(exc), EXIT_ERROR)
    except QuarantineError as exc:
        return _fail(as_json, "quarantine", str(exc), EXIT_ERROR)
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # a path the command was given or configured with, not a crash
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
        return _fail(as_json, "os", f"{where}{exc.strerror or exc}", EXIT_ERROR)
    except KeyboardInterrupt:
        return 130


def _fail(as_json: bool, kind: str, message: str, status: int) -> int:
    """An error as one line: on stderr, or under --json as a JSON object on stdout (where a
    script reading the command's JSON looks)."""
    if as_json:
        _print_json({"error": kind, "message": message, "exit_status": status})
    else:
        _err(message)
    return status


if __name__ == "__main__":
    sys.exit(main())
