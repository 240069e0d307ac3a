"""Benchmark: what the second look costs a query, at dictionary sizes up to 10M.

    ./dev bench bench_lookup [--sizes 1000000,10000000] [--queries 300]

A SQLite store of N records, each with a stored signature (`Signature.to_bytes()`), is
queried the way the daemon queries it (`dedupd.pipeline.find_duplicates`, with the
default d <= 4), in three ways, one thread, latency per query p50/p99 in microseconds:

  hash only       store.find_matches: the lookup as it was before the second look (a
                  newcomer without a signature takes exactly this path)
  second look     find_duplicates: the lookup, then the candidates' stored signatures
                  read and compared (`dedupd.signature.confirms`)
  + flips         find_duplicates with match_flips_rotations: a newcomer that matches
                  nothing is also looked up as its 7 mirror images and rotations

Stored hashes are uniformly random 64-bit values with random signature bytes, plus,
for each of the query pictures (common.py's photo-like generator), one planted record:
the picture's own signature under a hash 1-4 bits from the picture's. Half the queries
are those pictures (a duplicate is found), half are other pictures (nothing is: for
"+ flips" the full 8 lookups). A crowded case, `--crowd` records within 4 bits of one
query's hash (dark frames, blank pages hash alike), shows the cost of reading
CANDIDATES signatures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cv2  # noqa: E402
from common import machine, photo  # noqa: E402

from dedupd.hashing import ImageHash, Recipe, hash_bytes  # noqa: E402
from dedupd.pipeline import find_duplicates  # noqa: E402
from dedupd.signature import SIGNATURE_BYTES  # noqa: E402
from dedupd.store import ImageRecord  # noqa: E402
from dedupd.store.sqlite import SQLiteStore  # noqa: E402

SCOPE = "bench"
RECIPE = Recipe()
D = 4


def pictures(count: int, seed: int) -> list[ImageHash]:
    out = []
    for i in range(count):
        img = photo(seed + i, 1024, 768)
        data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        out.append(hash_bytes(data, RECIPE))
    return out


def flip_bits(value: int, count: int, rng: np.random.Generator) -> int:
    for b in rng.choice(64, count, replace=False):
        value ^= 1 << int(b)
    return value


def build(path: str, n: int, planted: list[ImageHash], crowd_of: ImageHash, crowd: int,
          rng: np.random.Generator) -> SQLiteStore:
    store = SQLiteStore(path)
    sig_version = planted[0].signature.to_bytes()[:1]  # type: ignore[union-attr]
    batch, t = 100_000, time.perf_counter()
    filler = n - len(planted) - crowd
    for start in range(0, filler, batch):
        count = min(batch, filler - start)
        hashes = rng.integers(0, 2**64, count, dtype=np.uint64).tolist()
        sigs = rng.integers(0, 256, (count, SIGNATURE_BYTES), dtype=np.uint8)
        store.insert_many([
            ImageRecord(SCOPE, f"/data/{start + i:09d}.jpg", RECIPE.key, h, f"{start + i:064x}",
                        100_000, 0, 1024, 768,
                        signature=sig_version + sigs[i, 1:].tobytes())
            for i, h in enumerate(hashes)])
    extra = [ImageRecord(SCOPE, f"/planted/{i}.jpg", RECIPE.key,
                         flip_bits(p.hash, 1 + i % D, rng), f"p{i}", 100_000, 0, 1024, 768,
                         signature=p.signature.to_bytes())  # type: ignore[union-attr]
             for i, p in enumerate(planted)]
    # A crowd of look-alikes of one picture that its second look must all refuse.
    other = planted[0].signature.to_bytes()  # type: ignore[union-attr]
    extra += [ImageRecord(SCOPE, f"/crowd/{i}.jpg", RECIPE.key,
                          flip_bits(crowd_of.hash, 1 + i % D, rng), f"c{i}", 100_000, 0,
                          1024, 768, signature=other) for i in range(crowd)]
    store.insert_many(extra)
    spent = time.perf_counter() - t
    store.warm(SCOPE, RECIPE.key)
    print(f"store: {n:,} records with signatures in {spent:.0f} s "
          f"({os.path.getsize(path) / 2**20:,.0f} MiB)", flush=True)
    return store


def timed(fn: Callable[[ImageHash], object], queries: list[ImageHash], repeat: int
          ) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        for q in queries:
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
    a = np.array(times) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_size(n: int, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(n)
    per = max(1, args.queries // 6)  # 3 repeats of per matching + per other pictures
    planted, others = pictures(per, 1_000), pictures(per, 5_000)
    crowd_of = others[0]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        store = build(os.path.join(d, "index.sqlite"), n, planted, crowd_of, args.crowd, rng)
        queries = planted + others[1:]
        found = sum(bool(find_duplicates(store, SCOPE, q, D)) for q in queries)
        print(f"{len(queries)} queries, {found} find a duplicate (expected {len(planted)})")
        rows = {
            "hash only": lambda q: store.find_matches(SCOPE, RECIPE.key, q.hash, q.digest, D,
                                                      limit=32),
            "second look": lambda q: find_duplicates(store, SCOPE, q, D),
            "+ flips": lambda q: find_duplicates(store, SCOPE, q, D, flips=True),
        }
        print(f"{'d <= 4, µs':<14}{'p50':>9}{'p99':>9}   crowded ({args.crowd:,} within 4 "
              "bits) p50/p99")
        for name, fn in rows.items():
            p50, p99 = timed(fn, queries, 3)
            c50, c99 = timed(fn, [crowd_of], 20)
            print(f"{name:<14}{p50:>9.0f}{p99:>9.0f}   {c50:>8.0f}/{c99:<8.0f}", flush=True)
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--crowd", type=int, default=1000)
    args = ap.parse_args()
    print(machine())
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"\n== {n:,} records")
        bench_size(n, args)


if __name__ == "__main__":
    main()
