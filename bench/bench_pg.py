"""PostgreSQL store vs the SQLite store, side by side: bulk insert rate and near-duplicate
query latency (exact, d<=4, d<=8, d<=10) at several dictionary sizes.

    ./dev bench bench_pg [--sizes 1000000,10000000] [--queries 300] [--pg URL]

--pg is an admin DSN (default $DEDUPD_BENCH_PG, else postgresql://postgres@127.0.0.1:5432/test);
the run creates a scratch database next to it and drops it at the end. Hashes are uniformly
random 64-bit values; half of the queries are planted neighbours (1-8 bits from a stored
hash). Latency is one thread calling Store.find_matches end to end (rows fetched and
decoded), p50/p99 in milliseconds; PostgreSQL runs after VACUUM ANALYZE, SQLite after its
in-memory index is loaded (load time shown). 10M rows need ~15 GB of disk and ~25 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from urllib.parse import urlsplit

import numpy as np
import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dedupd.store import ImageRecord  # noqa: E402
from dedupd.store.postgres import PostgresStore  # noqa: E402
from dedupd.store.sqlite import SQLiteStore  # noqa: E402

RECIPE = "dhash:8:fast:area:v1"
DISTANCES = (0, 4, 8, 10)
BATCH = 100_000


def records(hashes: np.ndarray, start: int) -> list[ImageRecord]:
    return [ImageRecord("bench", f"/data/{start + i:08d}.jpg", RECIPE, h, f"{start + i:x}",
                        1000, 1, 640, 480, 0.0) for i, h in enumerate(hashes.tolist())]


def load(store, hashes: np.ndarray, already: int) -> float:
    """Insert hashes[already:] in batches; returns rows per second."""
    t = time.perf_counter()
    for i in range(already, len(hashes), BATCH):
        store.insert_many(records(hashes[i:i + BATCH], i))
    return (len(hashes) - already) / (time.perf_counter() - t)


def latencies(store, queries: list[int], d: int) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        store.find_matches("bench", RECIPE, q, None, d, limit=10)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--pg", default=os.environ.get("DEDUPD_BENCH_PG",
                                                   "postgresql://postgres@127.0.0.1:5432/test"))
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64, sizes[-1], dtype=np.uint64, endpoint=False)
    name = f"dedupd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlsplit(args.pg)._replace(path=f"/{name}").geturl()
    tmp = tempfile.mkdtemp(prefix="dedupd-bench-")
    pg, lite = PostgresStore(url), SQLiteStore(os.path.join(tmp, "index.sqlite"))
    print(f"{'rows':>10} {'backend':<10} {'insert/s':>9} {'prep s':>7} " +
          " ".join(f"{'d<=' + str(d) + ' p50/p99 ms':>21}" for d in DISTANCES), flush=True)
    loaded = 0
    try:
        for n in sizes:
            part = hashes[:n]
            picks = rng.integers(0, n, args.queries)
            queries = []
            for k, i in enumerate(picks.tolist()):
                q = int(part[i])
                if k % 2:  # a planted neighbour 1-8 bits away
                    for b in rng.choice(64, int(rng.integers(1, 9)), replace=False).tolist():
                        q ^= 1 << b
                else:
                    q = int(rng.integers(0, 2**64, dtype=np.uint64))
                queries.append(q)
            for label, store in (("postgresql", pg), ("sqlite", lite)):
                rate = load(store, part, loaded)
                t = time.perf_counter()
                if store is pg:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute("VACUUM ANALYZE images")
                else:
                    store.warm("bench", RECIPE)
                prep = time.perf_counter() - t
                cells = []
                for d in DISTANCES:
                    p50, p99 = latencies(store, queries, d)
                    cells.append(f"{p50:>10.2f}/{p99:<10.2f}")
                print(f"{n:>10,} {label:<10} {rate:>9,.0f} {prep:>7.1f} " + " ".join(cells),
                      flush=True)
            with psycopg.connect(url) as conn:
                (size,) = conn.execute("SELECT pg_total_relation_size('images')").fetchone()
            print(f"{'':>10} sizes: postgresql images+indexes {size / 2**30:.2f} GiB, "
                  f"sqlite file {os.path.getsize(lite.path) / 2**30:.2f} GiB", flush=True)
            loaded = n
    finally:
        pg.close()
        lite.close()
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
