"""Hash dictionary benchmark: dedupd's multi-index HammingIndex vs a brute-force numpy
scan vs a BK-tree, at several sizes, plus SQLite bulk insert and the real daemon's start
to READY=1 (and its resident memory) on a store of that size.

    ./dev bench bench_store [--sizes 100000,1000000,10000000] [--queries 300]

Hashes are uniformly random 64-bit values; half of the queries are planted neighbours
(1-8 bits away from a stored hash) so near-duplicate queries return something.
Latencies are one thread, per query, p50/p99 in microseconds.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dedupd.store import ImageRecord  # noqa: E402
from dedupd.store.hamming import HammingIndex  # noqa: E402
from dedupd.store.sqlite import SQLiteStore  # noqa: E402

RECIPE = "dhash:8:fast:area:v1"
DISTANCES = (0, 4, 8, 10)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class BKTree:
    """The classic metric tree for Hamming distance (nodes as [hash, id, {dist: child}])."""

    def __init__(self) -> None:
        self.root: list | None = None

    def add(self, h: int, i: int) -> None:
        if self.root is None:
            self.root = [h, i, {}]
            return
        node = self.root
        while True:
            d = (node[0] ^ h).bit_count()
            child = node[2].get(d)
            if child is None:
                node[2][d] = [h, i, {}]
                return
            node = child

    def query(self, h: int, k: int) -> list[tuple[int, int]]:
        out, stack = [], [self.root] if self.root else []
        while stack:
            node = stack.pop()
            d = (node[0] ^ h).bit_count()
            if d <= k:
                out.append((node[1], d))
            for dist, child in node[2].items():
                if d - k <= dist <= d + k:
                    stack.append(child)
        return sorted(out, key=lambda t: (t[1], t[0]))


def brute(hashes: np.ndarray, q: int, d: int) -> np.ndarray:
    dist = np.bitwise_count(hashes ^ np.uint64(q))
    return np.flatnonzero(dist <= d)


def percentiles(fn, queries: list[int], d: int) -> tuple[float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q, d)
        times.append(time.perf_counter() - t)
    a = np.array(times) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def make_queries(hashes: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    picks = hashes[rng.integers(0, len(hashes), n)]
    out = []
    for i, h in enumerate(picks):
        h = int(h)
        if i % 2:
            for b in rng.choice(64, 1 + i % 8, replace=False):
                h ^= 1 << int(b)
        out.append(h)
    return out


def bench_sqlite(n: int, hashes: np.ndarray) -> None:
    """Bulk insert rate, then the real daemon's start to READY=1 on that store: after a
    clean stop (snapshot fresh), after a SIGKILL (snapshot stale by 100k inserts and 10k
    updates) and with no snapshot at all; with the daemon's resident memory at READY."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = os.path.join(d, "index.sqlite")
        store = SQLiteStore(path)
        batch, spent = 100_000, 0.0
        for start in range(0, n, batch):
            records = [ImageRecord("bench", f"/data/{i:09d}.jpg", RECIPE, int(hashes[i]),
                                   f"{i:064x}", 100_000, 0, 1024, 768)
                       for i in range(start, min(n, start + batch))]
            t = time.perf_counter()
            store.insert_many(records)
            spent += time.perf_counter() - t
        print(f"SQLite: bulk insert {n / spent:,.0f} rows/s (batches of {batch:,}); "
              f"file {os.path.getsize(path) / 2**20:,.0f} MiB")
        t = time.perf_counter()
        store.warm("bench", RECIPE)
        print(f"SQLite: index load from SQL {time.perf_counter() - t:.2f} s")
        store.close()  # clean stop: writes the snapshot
        print(f"daemon start to READY, clean stop before:  {daemon_ready(d, path)}")
        store = SQLiteStore(path)
        store.warm("bench", RECIPE)
        extra = min(100_000, n // 10)
        store.insert_many([ImageRecord("bench", f"/new/{i:09d}.jpg", RECIPE, i, f"n{i}",
                                       1, 0, 1, 1) for i in range(extra)])
        for i in range(1, extra // 10 + 1):
            rec = store.get(i)
            store.update(rec.with_(hash=rec.hash ^ 1))  # type: ignore[union-attr]
        store._db.close()  # as if killed: no checkpoint, the snapshot is stale
        print(f"daemon start to READY, after a SIGKILL:    {daemon_ready(d, path)} "
              f"({extra:,} inserts and {extra // 10:,} updates to catch up)")
        for snap in os.listdir(d):
            if ".hamming-" in snap:
                os.unlink(os.path.join(d, snap))
        print(f"daemon start to READY, no snapshot at all: {daemon_ready(d, path)}")


def daemon_ready(workdir: str, index: str) -> str:
    """Start `dedupd run` on index with a real NOTIFY_SOCKET; time to READY=1 and RSS."""
    import socket
    import subprocess

    import yaml

    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    config = os.path.join(workdir, "dedupd.yaml")
    with open(config, "w") as fh:
        yaml.safe_dump({"index": index, "quarantine_dir": os.path.join(workdir, "q"),
                        "watches": [{"path": root, "group": "bench"}]}, fh)
    sock_path = os.path.join(workdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(120)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dedupd", "--config", config, "--log",
                             "stderr", "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in sock.recv(65536):
            pass
        ready = time.perf_counter() - t
        with open(f"/proc/{proc.pid}/status") as fh:
            mem = {k: int(v.split()[0]) / 1024 for k, v in
                   (line.split(":", 1) for line in fh) if k in ("VmRSS", "VmHWM")}
    finally:
        proc.terminate()
        proc.wait(60)
        sock.close()
        os.unlink(sock_path)
    return f"{ready:.2f} s, RSS {mem['VmRSS']:,.0f} MiB (peak {mem['VmHWM']:,.0f} MiB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--bktree-max", type=int, default=1_000_000,
                    help="skip the BK-tree above this size (pure Python: slow to build)")
    ap.add_argument("--no-sqlite", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {os.cpu_count()} cores; one query thread; latencies p50/p99 in µs")
    for n in (int(s) for s in args.sizes.split(",")):
        bench_size(n, rng, args)


def bench_size(n: int, rng: np.random.Generator, args: argparse.Namespace) -> None:
    gc.collect()
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    queries = make_queries(hashes, args.queries, rng)
    print(f"\n== {n:,} hashes")
    base = rss_mb()
    t = time.perf_counter()
    index = HammingIndex(64)
    index.add_many(np.arange(1, n + 1, dtype=np.int64), hashes.reshape(-1, 1))
    build = time.perf_counter() - t
    print(f"HammingIndex build {build:.2f} s ({n / build / 1e6:.1f} M/s), "
          f"{index.nbytes / 2**20:.0f} MiB arrays, RSS +{rss_mb() - base:.0f} MiB")
    tree = None
    if n <= args.bktree_max:
        t = time.perf_counter()
        tree = BKTree()
        for i, h in enumerate(hashes.tolist(), 1):
            tree.add(h, i)
        print(f"BK-tree build {time.perf_counter() - t:.1f} s")
    else:
        print(f"BK-tree skipped (> {args.bktree_max:,}: pure-Python build too slow)")
    print(f"{'d':>3} {'HammingIndex':>18} {'numpy scan':>18} {'BK-tree':>18} {'hits':>6}")
    for d in DISTANCES:
        mih = percentiles(lambda q, k: index.query(q, k), queries * (4 if d == 0 else 1), d)
        flat = percentiles(lambda q, k: brute(hashes, q, k), queries, d)
        bk = percentiles(lambda q, k: tree.query(q, k), queries[:50], d) if tree else None
        hits = np.mean([len(index.query(q, d)) for q in queries[:50]])
        for q in queries[:20]:  # the bench also checks correctness
            assert len(index.query(q, d)) == len(brute(hashes, q, d))
        bk_txt = f"{bk[0]:>8.0f}/{bk[1]:<9.0f}" if bk else f"{'-':>18}"
        print(f"{d:>3} {mih[0]:>8.1f}/{mih[1]:<9.1f} {flat[0]:>8.0f}/{flat[1]:<9.0f} "
              f"{bk_txt} {hits:>6.1f}")
    # Steady state: hashes added one at a time since the last rebuild (the delta, up to
    # 1/64 of the index before the next one), as in a daemon that keeps ingesting.
    extra = max(4096, n // 64) - 1
    for i, h in enumerate(rng.integers(0, 2**64, extra, dtype=np.uint64).tolist()):
        index.add(n + 1 + i, h)
    delta = index._n - index._built
    for d in (0, 8):
        p50, p99 = percentiles(lambda q, k: index.query(q, k),
                               queries * (4 if d == 0 else 1), d)
        print(f"{d:>3} {p50:>8.1f}/{p99:<9.1f} with {delta:,} hashes added since the last "
              "rebuild")
    if not args.no_sqlite:
        bench_sqlite(n, hashes)


if __name__ == "__main__":
    main()
