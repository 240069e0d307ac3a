"""Benchmark 5: the daemon's memory over a 20k-image soak stays flat beyond the store's
own growth.

    ./dev bench bench_soak [--count 20000] [--batch 1000]

The daemon (`dedupd run`, subprocess) watches a temporary root; bench 2's 0.3-0.7 MP
set (about half near-duplicates, which get quarantined: journal entries, sidecars,
moves) is renamed in, `--batch` files at a time, each batch after the previous one is
decided. RSS is sampled every 0.25 s. The store is allowed to grow: its in-memory
Hamming index (measured here with the real class for the same number of records) and
SQLite's page cache, at most the database file's size (its cache is capped at 64 MiB).
Growth is measured from the end of the first batch (allocator and libjpeg pools warm),
and whatever exceeds the store's allowance must stay under 10% of the start RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_e2e import stage  # noqa: E402
from common import (  # noqa: E402
    BENCH_DATA,
    SIZES_SCAN,
    DaemonUnderTest,
    machine,
    photo_set,
    verdict,
    warm,
)

from dedupd.store.hamming import HammingIndex  # noqa: E402


def index_bytes(n: int) -> int:
    """What the daemon's in-memory Hamming index holds for n records of 64-bit hashes."""
    idx = HammingIndex(64)
    rng = np.random.default_rng(0)
    idx.add_many(np.arange(1, n + 1), rng.integers(0, 2**63, n, dtype=np.uint64))
    return idx.nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()

    files = photo_set("scan", args.count, SIZES_SCAN, originals=1250, seed=2)
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=BENCH_DATA))
    root = work / "root"
    root.mkdir()
    samples: list[tuple[float, int, int]] = []  # (time, files decided, RSS KiB)
    daemon = DaemonUnderTest(work, [root], circuit_breaker={"threshold": 0.9})
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), len(daemon.decided), daemon.rss_kb()))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_start = daemon.rss_kb()
    marks: list[tuple[int, int]] = []  # (files decided, RSS KiB) after each batch
    started = time.monotonic()
    try:
        sampler.start()
        for first in range(0, len(files), args.batch):
            warm(files[first:first + args.batch])
            pairs = stage(files[first:first + args.batch], root)
            for tmp, final in pairs:
                os.rename(tmp, final)
            if not daemon.wait_decided([str(final) for _, final in pairs], 600):
                raise SystemExit("a batch was not decided within 600 s")
            marks.append((len(daemon.decided), daemon.rss_kb()))
            print(f"  {marks[-1][0]:>6} decided, RSS {marks[-1][1] / 1024:6.1f} MiB",
                  file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        db = work / "state" / "index.sqlite"
        db_bytes = sum(p.stat().st_size for p in db.parent.glob("index.sqlite*"))
    finally:
        stop.set()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)

    kept = daemon.kinds.get("image_accepted", 0)
    records = len(daemon.decided)  # quarantined files keep their record too
    allowance = index_bytes(records) / 1024 + min(db_bytes, 64 << 20) / 1024
    rss_warm = marks[0][1]
    end = marks[-1][1]
    peak = max(s[2] for s in samples)
    print(f"\nsoak: {len(daemon.decided)} files in {elapsed:.0f} s "
          f"({len(daemon.decided) / elapsed:.0f}/s); decisions {daemon.kinds}")
    print(f"  RSS at start {rss_start / 1024:.1f} MiB, after batch 1 {rss_warm / 1024:.1f} MiB, "
          f"middle {marks[len(marks) // 2][1] / 1024:.1f} MiB, end {end / 1024:.1f} MiB, "
          f"peak {peak / 1024:.1f} MiB")
    print(f"  store growth allowed: Hamming index {index_bytes(records) / 1024:.0f} KiB "
          f"({index_bytes(records) / max(records, 1):.0f} B/record) + SQLite page cache <= "
          f"database size {db_bytes / 1024:.0f} KiB ({db_bytes / max(records, 1):.0f} B/record,"
          f" {kept} kept)")
    growth = end - rss_warm
    beyond = growth - allowance
    print(f"  growth after batch 1: {growth / 1024:.1f} MiB; beyond the store's allowance: "
          f"{beyond / 1024:.1f} MiB")
    ok = beyond <= 0.1 * rss_warm
    print(f"\ntargets\n  {verdict(ok)}  RSS flat beyond the store (excess <= 10% of the "
          f"warm RSS, {0.1 * rss_warm / 1024:.1f} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
