"""`dedupd scan`, `check` and `hash`: hashing files named on the command line (on all
cores), checking them against the dictionary, indexing them under their roots' policies."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dedupd.cli.output import (
    EXIT_DUPLICATE,
    EXIT_ERROR,
    EXIT_OK,
    Progress,
    UsageError,
    print_error,
    print_json,
    print_line,
)
from dedupd.cli.parallel import HashOutcome, default_workers, hash_many, hash_one
from dedupd.config import Config
from dedupd.hashing import ImageError, ImageHash, Recipe, hash_to_hex
from dedupd.matching import find_duplicates
from dedupd.pipeline import Pipeline, record_for
from dedupd.selection import Selected, select, walk
from dedupd.signature import Signature, confirms
from dedupd.store import ImageRecord, Match, Store, StoreMissing, open_store
from dedupd.store.base import UNRESOLVED
from dedupd.store.hamming import HammingIndex

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
                print_line(f"{o.result.hex}  {o.path}")
                _warn_decoded(o.path, o.result.warnings)
        else:
            assert o.error is not None
            status = EXIT_ERROR
            if args.json:
                out.append(bad_file(o.path, o.error))
            else:
                say_bad_file(bad_file(o.path, o.error))
    if args.json:
        print_json(out)
    return status


def bad_file(path: str, error: ImageError) -> dict[str, str]:
    """A file that could not be hashed, as hash, check and scan report it under --json."""
    return {"path": path, "error": error.kind, "reason": error.reason}


def say_bad_file(bad: dict[str, str]) -> None:
    """The same, as one line on stderr."""
    print_error(f"{bad['path']}: {bad['error']}: {bad['reason']}")


def _warn_decoded(path: str, warnings: Sequence[str]) -> None:
    """What the decoder said about an image it still decoded, on one line with the path."""
    if warnings:
        print_error(f"{path}: warning: decoded with complaints (hashed anyway): "
                    f"{'; '.join(warnings)}")


def _strict(m: Match, max_distance: int) -> bool:
    """A match beyond the threshold (up to matching.lookup_radius): only the strict second
    look confirmed it, so `check` says so beside a distance above max_distance."""
    return not m.identical and m.distance > max_distance


def _match_json(m: Match, size: int, max_distance: int) -> dict[str, Any]:
    out = {"path": m.record.path, "distance": m.distance, "identical": m.identical,
           "strict_second_look": _strict(m, max_distance),
           "hash": hash_to_hex(m.record.hash, size), "id": m.record.id,
           "status": m.record.status}
    if m.transform is not None:
        out["transform"] = m.transform
    return out


class _Scan:
    """One `dedupd scan`: a file under a watch root goes the daemon's way (the
    pipeline: its root's policy, acted on); anything else, and everything in a dry run,
    is matched and reported only (indexed too, outside the roots, unless a dry run)."""

    def __init__(self, config: Config, store: Store, roots: list[Path], *,
                 dry_run: bool, files: int) -> None:
        self.config, self.store, self.roots, self.dry_run = config, store, roots, dry_run
        self.pipeline = Pipeline(config, store)
        self.pipeline.breaker_until = "the end of this scan"
        self.started = time.monotonic()
        self.counts = {"files": files, "indexed": 0, "known": 0, "duplicates": 0,
                       "quarantined": 0, "deleted": 0, "errors": 0}
        self.groups: dict[str, list[dict[str, Any]]] = {}
        self.errors: list[dict[str, str]] = []
        self.warned: list[dict[str, Any]] = []  # decoded, with the decoder's complaints
        # Outside the watch roots, inserts go to the store in batches of 500, so images
        # this run has indexed (or, in a dry run, would have) are also matched against an
        # index of their own.
        self.pending: list[ImageRecord] = []
        self.seen_index: dict[str, HammingIndex] = {}
        self.seen: dict[int, ImageRecord] = {}

    def take(self, o: HashOutcome) -> None:
        """One hashed (or failed) file."""
        if o.error is not None or o.result is None:
            assert o.error is not None
            self.counts["errors"] += 1
            self.errors.append(bad_file(o.path, o.error))
            return
        if o.result.warnings:
            self.warned.append({"path": o.path, "warnings": list(o.result.warnings)})
        known = self.store.get_by_path(o.path)
        if known is not None and known.digest == o.result.digest \
                and known.recipe == self.config.recipe.key and known.status != UNRESOLVED:
            self.counts["known"] += 1
            return
        path = Path(o.path)
        selected = select(self.config, path)
        if self.config.watch_for(path) is not None and selected is None:
            return  # under a root, but not the root's: the daemon leaves it too
        if selected is not None and not self.dry_run:
            self._ingest(path, o.result, o.mtime_ns, known)
        else:
            self._report_only(path, o.result, o.mtime_ns, known, selected)

    def _ingest(self, path: Path, hashed: ImageHash, mtime_ns: int,
                known: ImageRecord | None) -> None:
        """The daemon's path. Found by a scan: keep: first goes by mtime, whichever
        copy hashed first."""
        admitted = self.pipeline.admit(path)
        if admitted is None:
            return
        done = self.pipeline.ingest(path, admitted.selected.watch, hashed, mtime_ns, known,
                                    arrival=mtime_ns / 1e9, queued=self.started)
        if done is not None and done.match is not None and done.loser is not None:
            winner = str(path) if done.loser != str(path) else done.match.record.path
            self._report(winner, done.loser, done.match, action=done.action,
                         moved_to=done.moved_to)
            self.counts["quarantined"] += done.moved_to is not None
            self.counts["deleted"] += done.action == "delete"
        self.counts["indexed"] += done is not None and done.accepted

    def _report_only(self, path: Path, hashed: ImageHash, mtime_ns: int,
                     known: ImageRecord | None, selected: Selected | None) -> None:
        if selected is not None:
            scope, policy = selected.scope, selected.policy
        else:
            scope = str(next(r for r in self.roots if r == path or r in path.parents))
            policy = self.config.policies["default"]
        record = record_for(hashed, scope, path, mtime_ns)
        matches = find_duplicates(self.store, scope, hashed, policy.max_distance,
                                  exclude=str(path), limit=1) \
            or self._seen_before(record, hashed, policy.max_distance)
        if matches:
            self._report(matches[0].record.path, str(path), matches[0])
            return
        if self.dry_run or known is None:  # matched by the files after it
            rid = len(self.seen) + 1
            self.seen[rid] = record.with_(id=rid)
            self.seen_index[scope].add(rid, record.hash)
        if self.dry_run:
            return
        self.counts["indexed"] += 1
        if known is None:
            self.pending.append(record)
            if len(self.pending) >= 500:
                self.flush()
        else:  # changed, or hashed with another recipe: re-hashed
            self.store.update(record.with_(id=known.id, first_seen=known.first_seen,
                                           status=known.status))

    def _seen_before(self, record: ImageRecord, hashed: ImageHash, max_distance: int
                     ) -> list[Match]:
        """A copy among the files this run indexed (or would have) and not yet stored."""
        idx = self.seen_index.get(record.scope)
        if idx is None:
            idx = self.seen_index[record.scope] = HammingIndex(self.config.recipe.bits)
        mine = hashed.signature
        for rid, distance in idx.query(record.hash, max_distance, 32):
            prior = self.seen[rid]
            same = prior.digest == record.digest
            theirs = Signature.from_bytes(prior.signature or b"")
            if same or mine is None or theirs is None or confirms(mine, theirs, max_distance):
                return [Match(prior, distance, same)]
        return []

    def _report(self, original: str, path: str, match: Match, **more: Any) -> None:
        self.counts["duplicates"] += 1
        self.groups.setdefault(original, []).append(
            {"path": path, "distance": match.distance, "identical": match.identical, **more})

    def flush(self) -> None:
        if self.pending:
            self.store.insert_many(self.pending)
            self.pending.clear()

    def summary(self, workers: int) -> dict[str, Any]:
        return {**self.counts, "dry_run": self.dry_run,
                "seconds": round(time.monotonic() - self.started, 3), "workers": workers,
                "groups": [{"original": k, "duplicates": v} for k, v in self.groups.items()],
                "errors_detail": self.errors, "warnings_detail": self.warned}


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    """Hash on all cores; apply the root's policy to files under a configured watch root
    (exactly as the daemon would), index and report everything else."""
    roots = [Path(p).resolve() for p in args.paths]
    for r in roots:
        if not r.exists():
            raise UsageError(f"{r}: no such file or directory")
    files = [str(p) for p in walk(roots, config)]
    _scan_logging(args, config)
    store = open_store(config.index)
    workers = args.workers or default_workers(config)
    progress = Progress(len(files), "scan", enabled=None if not args.json else False)
    scan = _Scan(config, store, roots, dry_run=args.dry_run, files=len(files))
    try:
        for o in hash_many(files, config.recipe, config.max_pixels, workers):
            progress.step()
            scan.take(o)
        scan.flush()
    finally:
        progress.close()
        store.close()
    summary = scan.summary(workers)
    if args.json:
        print_json(summary)
    else:
        _print_scan(summary)
    if summary["errors"]:  # some files were not looked at: not a clean result either way
        return EXIT_ERROR
    return EXIT_DUPLICATE if summary["duplicates"] else EXIT_OK


def _print_scan(summary: dict[str, Any]) -> None:
    for group in summary["groups"]:
        print_line(group["original"])
        for d in group["duplicates"]:
            done = f"  -> {d['moved_to']}" if d.get("moved_to") else \
                "  (deleted)" if d.get("action") == "delete" else ""
            print_line(f"  {d['distance']:>3}  {d['path']}{done}")
    for w in summary["warnings_detail"]:
        _warn_decoded(w["path"], w["warnings"])
    for bad in summary["errors_detail"]:
        say_bad_file(bad)
    elapsed = summary["seconds"]
    rate = summary["files"] / elapsed if elapsed > 0 else 0.0
    print(f"{summary['files']} files, {summary['indexed']} indexed, {summary['known']} "
          f"already known, {summary['duplicates']} duplicates ({summary['quarantined']} "
          f"quarantined, {summary['deleted']} deleted), {summary['errors']} errors in "
          f"{elapsed:.1f} s ({rate:,.0f}/s){' [dry run]' if summary['dry_run'] else ''}",
          file=sys.stderr)


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
    try:
        store = open_store(config.index, create=False)
    except StoreMissing:  # nothing indexed yet: every file is unique; no store is created
        store = None
    duplicates = errors = 0
    try:
        all_scopes = functools.cache(lambda: [] if store is None else
                                     list(store.stats().scopes))
        for root in (Path(f).resolve() for f in args.files):
            # A named file is checked whatever it is (a missing one, a FIFO: the same
            # one-line error as `hash`); a directory is walked.
            for path in walk([root], config):
                outcome = hash_one((str(path), config.recipe, config.max_pixels, True))
                if outcome.result is None:
                    assert outcome.error is not None
                    errors += 1
                    _check_error(args.json, path, outcome.error)
                    continue
                if not args.json:
                    _warn_decoded(str(path), outcome.result.warnings)
                max_distance, matches = _nearest(store, config, args, path, outcome.result,
                                                 all_scopes)
                duplicates += bool(matches)
                _check_report(args, path, outcome.result, max_distance, matches,
                              config.recipe.size)
    finally:
        if store is not None:
            store.close()
    if duplicates:
        return EXIT_DUPLICATE
    return EXIT_ERROR if errors else EXIT_OK


def _check_error(as_json: bool, path: Path, error: ImageError) -> None:
    if as_json:
        print_json(bad_file(str(path), error))
    else:
        say_bad_file(bad_file(str(path), error))


def _nearest(store: Store | None, config: Config, args: argparse.Namespace, path: Path,
             result: ImageHash, all_scopes: Callable[[], list[str]]) -> tuple[int, list[Match]]:
    """The threshold for path and the nearest confirmed matches within it: in --scope, else
    in its watch's group, else in every group."""
    watch = config.watch_for(path)
    policy = config.policy_for(watch) if watch else config.policies["default"]
    max_distance = policy.max_distance if args.max_distance is None else args.max_distance
    if store is None:
        return max_distance, []
    scopes = [args.scope] if args.scope else [watch.scope] if watch else all_scopes()
    matches: list[Match] = []
    for scope in scopes:
        matches += find_duplicates(store, scope, result, max_distance,
                                   flips=policy.match_flips_rotations,
                                   exclude=str(path), limit=args.limit)
    matches.sort(key=lambda m: (m.distance, not m.identical))
    return max_distance, matches[: args.limit]


def _check_report(args: argparse.Namespace, path: Path, result: ImageHash, max_distance: int,
                  matches: list[Match], size: int) -> None:
    low = result.low_information
    if args.json:
        print_json({"path": str(path), "hash": result.hex, "max_distance": max_distance,
                     "duplicate": bool(matches), "low_information": low,
                     "warnings": list(result.warnings),
                     "matches": [_match_json(m, size, max_distance) for m in matches]})
        return
    note = "  (low_information)" if low else ""
    if not matches:
        print_line(f"unique  {path}{note}")
        return
    print_line(f"duplicate  {path}{note}")
    for m in matches:
        notes = ["identical"] if m.identical else [m.transform] if m.transform else []
        if _strict(m, max_distance):
            notes.append(f"beyond max_distance {max_distance}: strict second look")
        extra = f"  ({'; '.join(notes)})" if notes else ""
        print_line(f"  {m.distance:>3}  {m.record.path}{extra}")


