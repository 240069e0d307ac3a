"""Hashing the files a command is given: on several processes for scan and hash (outcomes
in input order), one at a time for check. Bad input is an outcome, never an exception,
so one unreadable file cannot break the process pool."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from dedupd.config import Config
from dedupd.hashing import ImageError, ImageHash, Recipe, hash_file


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
