"""`dedupd scan`, `check` and `hash`: hashing files named on the command line (on all
cores), checking them against the dictionary, indexing them under their roots' policies."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from dedupd.config import Config
from dedupd.hashing import ImageError, ImageHash, Recipe, hash_file, hash_to_hex
from dedupd.store import ImageRecord, Match, Store, open_store
from dedupd.store.base import UNRESOLVED, StoreMissing

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
                print_line(f"{o.result.hex}  {o.path}")
                _warn_decoded(o.path, o.result.warnings)
        else:
            assert o.error is not None
            status = EXIT_ERROR
            if args.json:
                out.append({"path": o.path, "error": o.error.kind, "reason": o.error.reason})
            else:
                print_error(f"{o.path}: {o.error.kind}: {o.error.reason}")
    if args.json:
        print_json(out)
    return status


def _warn_decoded(path: str, warnings: Sequence[str]) -> None:
    """What the decoder said about an image it still decoded, on one line with the path."""
    if warnings:
        print_error(f"{path}: warning: decoded with complaints (hashed anyway): "
                    f"{'; '.join(warnings)}")


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
        print_json(summary)
    else:
        for original, dups in groups.items():
            print_line(original)
            for d in dups:
                done = f"  -> {d['moved_to']}" if d.get("moved_to") else \
                    "  (deleted)" if d.get("action") == "delete" else ""
                print_line(f"  {d['distance']:>3}  {d['path']}{done}")
        for w in warned:
            _warn_decoded(w["path"], w["warnings"])
        for e in errors:
            print_error(f"{e['path']}: {e['error']}: {e['reason']}")
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
    try:
        store = open_store(config.index, create=False)
    except StoreMissing:  # nothing indexed yet: every file is unique; no store is created
        store = None
    duplicates = errors = 0
    try:
        all_scopes = functools.cache(lambda: [] if store is None else
                                     list(store.stats()["scopes"]))  # type: ignore[call-overload]
        for root in (Path(f).resolve() for f in args.files):
            # A named file is checked whatever it is (a missing one, a FIFO: the same
            # one-line error as `hash`); a directory is walked.
            for path in iter_image_files([root], config) if root.is_dir() else [root]:
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
        print_json({"path": str(path), "error": error.kind, "reason": error.reason})
    else:
        print_error(f"{path}: {error.kind}: {error.reason}")


def _nearest(store: Store | None, config: Config, args: argparse.Namespace, path: Path,
             result: ImageHash, all_scopes: Callable[[], list[str]]) -> tuple[int, list[Match]]:
    """The threshold for path and the nearest confirmed matches within it: in --scope, else
    in its watch's group, else in every group."""
    from dedupd.pipeline import find_duplicates

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
                     "matches": [_match_json(m, size) for m in matches]})
        return
    note = "  (low_information)" if low else ""
    if not matches:
        print_line(f"unique  {path}{note}")
        return
    print_line(f"duplicate  {path}{note}")
    for m in matches:
        extra = "  (identical)" if m.identical else f"  ({m.transform})" if m.transform else ""
        print_line(f"  {m.distance:>3}  {m.record.path}{extra}")


