"""Benchmark: does a shared PostgreSQL group scale with its hosts? (issue #14)

    ./dev bench bench_scale [--preload 1000000] [--images 2000] [--repeat 2]
                            [--sizes 1000000,10000000] [--pg URL]

One run, same machine, side by side (real daemons, each a "host" with its own drop
folder, all roots in one group, default policy d <= 4, `--preload` random hashes
already in the group, `--images` distinct 640x480 JPEGs per daemon renamed in at once;
throughput from the first arrival to the last decision, over all hosts):

  embedded 1x2    1 host, embedded SQLite store, 2 workers (the reference)
  pg 1x2          1 host on PostgreSQL, 2 workers
  pg 2x1, pg 3x1  2 and 3 hosts on PostgreSQL, 1 worker each
  pg 2x1 lax      2 hosts, DSN with synchronous_commit=off (claims not flushed one by
                  one: the embedded store's durability; journal writes still are)

Best of `--repeat` rounds, set-ups interleaved in each round. Then, per size in
`--sizes` (the group grown to that many rows by a server-side generator):

  serialised time per image: 4 threads with their own stores and replicas claim
  distinct hashes as fast as they can in one group; the server-side lock hold per
  claim (dedupd_claim's own clock, p50/p99) and 1 / the saturated claim rate (an upper
  bound: it includes the commit and the queueing); the group's cap is 1 / that.
  joining: a fresh daemon on the group, spawn -> READY (`started`), and its peak RSS.

--pg is an admin DSN (default $DEDUPD_BENCH_PG, else postgresql://postgres@127.0.0.1:5432/test);
the run creates a scratch database and drops it at the end. 10M rows take ~6 GB of disk
and several minutes to generate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psycopg

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import BENCH_DATA, DaemonUnderTest, describe, machine, percentile, photo_set  # noqa: E402

from dedupd.hashing import Recipe  # noqa: E402
from dedupd.store import ImageRecord  # noqa: E402
from dedupd.store.postgres import PostgresStore  # noqa: E402
from dedupd.store.sqlite import SQLiteStore  # noqa: E402

GROUP = "bench"
RECIPE = Recipe().key
LAX = "options=-csynchronous_commit%3Doff"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def grow_pg(url: str, rows: int) -> float:
    """Generate rows up to `rows` in the group, server-side (random-looking 64-bit hashes
    from md5, numbered 0: older than any replica); returns seconds."""
    started = time.perf_counter()
    store = PostgresStore(url, replicate=False)
    store.warm(GROUP, RECIPE)  # the collection row
    store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        (coll,) = conn.execute("SELECT id FROM collections WHERE scope = %s AND recipe = %s",
                               (GROUP, RECIPE)).fetchone()
        (have,) = conn.execute("SELECT count(*) FROM images WHERE path LIKE '/preload/%%'"
                               ).fetchone()
        # Millions of random keys inserted into eight btrees crawl (each insert a cache
        # miss); a scratch database builds them afterwards instead, sorted, as a restore
        # would.
        rebuild = [] if rows - have < 2_000_000 else conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'images' AND "
            "indexname NOT IN (SELECT conname FROM pg_constraint)").fetchall()
        for name, _ in rebuild:
            conn.execute(f'DROP INDEX "{name}"')
        step = 1_000_000
        for lo in range(have, rows, step):
            hi = min(rows, lo + step)
            conn.execute(
                "INSERT INTO images (coll, scope, path, recipe, hash, digest, file_size, "
                "mtime_ns, width, height, first_seen, status) "
                "SELECT %s, %s, '/preload/' || i, %s, "
                "('x' || substr(md5(i::text), 1, 16))::bit(64)::bigint, md5(i::text), "
                "1000, 1, 640, 480, 0, 'kept' FROM generate_series(%s::bigint, %s::bigint) i",
                (coll, GROUP, RECIPE, lo, hi - 1))
        conn.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in rebuild:
            conn.execute(definition)
        conn.execute("VACUUM ANALYZE images")
    return time.perf_counter() - started


def preload_sqlite(path: Path, url: str, rows: int) -> None:
    """The same preloaded hashes in an embedded store."""
    store = SQLiteStore(str(path))
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT path, hash, digest FROM images WHERE path LIKE "
                           "'/preload/%%' ORDER BY id")
        while batch := cur.fetchmany(100_000):
            store.insert_many([ImageRecord(GROUP, p, RECIPE, h % 2**64, d, 1000, 1, 640, 480,
                                           0.0) for p, h, d in batch])
    store.close()


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_cpu(url: str | None) -> dict[int, float]:
    """CPU seconds so far of the server processes that work for this run: the backends
    connected to its database and the server's own (WAL writer, checkpointer...; shared
    with anyone else using the server, so a little noisy)."""
    if url is None:
        return {}
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND "
            "pid <> pg_backend_pid()) OR backend_type NOT IN ('client backend', "
            "'autovacuum worker', 'parallel worker')")]
    return {pid: _cpu(pid) for pid in pids}


def _spy(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling the daemon (CPU only, not idle threads), if py-spy is installed."""
    exe = shutil.which("py-spy") or os.environ.get("PY_SPY")
    if not exe:
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "50", "-f", "raw",
                             "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def burst(label: str, work: Path, files: list[Path], hosts: int, workers: int,
          index: str, pg: str | None = None, profile: Path | None = None) -> float:
    """`hosts` daemons, `len(files) // hosts` files each, renamed in at once. Prints the
    rate and the CPU per image of the daemons and (with `pg`) of the database server:
    on a box whose cores the hosts and the server share, that is the budget."""
    daemons, pairs = [], []
    spies: list[subprocess.Popen] = []
    per = len(files) // hosts
    try:
        for h in range(hosts):
            root = work / f"host{h}" / "drop"
            root.mkdir(parents=True)
            daemons.append(DaemonUnderTest(
                work / f"host{h}", [root], index=index, workers=workers,
                watches=[{"path": str(root), "group": GROUP}],
                quarantine_dir=str(work / f"host{h}" / "q")))
            for f in files[h * per:(h + 1) * per]:
                tmp = root / f".{f.name}.tmp"
                os.link(f, tmp)
                pairs.append((daemons[-1], tmp, root / f.name))
        time.sleep(1.0)  # let the daemons read the link events (ignored names) first
        if profile is not None:
            tag = label.replace(" ", "_")
            spies = [s for i, d in enumerate(daemons)
                     if (s := _spy(d.proc.pid, profile / f"{tag}-host{i}.txt")) is not None]
        server0 = pg_cpu(pg)
        hosts0 = sum(d.cpu_seconds() for d in daemons)
        arrived = time.time()
        for _, tmp, final in sorted(pairs, key=lambda p: p[2].name):  # hosts interleaved
            os.rename(tmp, final)
        for d in daemons:
            mine = [str(final) for owner, _, final in pairs if owner is d]
            if not d.wait_decided(mine, 900):
                raise SystemExit(f"{label}: files never decided")
        last = max(max(d.decided.values()) for d in daemons)
        daemon_cpu = sum(d.cpu_seconds() for d in daemons) - hosts0
        server = pg_cpu(pg)
        server_cpu = sum(t - server0.get(pid, 0.0) for pid, t in server.items())
        kinds: dict[str, int] = {}
        for d in daemons:
            for k, n in d.kinds.items():
                kinds[k] = kinds.get(k, 0) + n
        rate = len(pairs) / (last - arrived)
        n = len(pairs)
        print(f"  {label:<14} {rate:8.1f} images/s  ({n} files in {last - arrived:.2f} s; "
              f"CPU/image: daemons {1000 * daemon_cpu / n:.2f} ms, server "
              f"{1000 * server_cpu / n:.2f} ms; {kinds}; {load()})", flush=True)
        return rate
    finally:
        for s in spies:
            s.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            s.wait(30)
        for d in daemons:
            d.stop()


def clean_pg(url: str) -> None:
    """Drop what a burst added (the preload stays)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM images WHERE path NOT LIKE '/preload/%%'")
        conn.execute("DELETE FROM quarantine")


def serialised(url: str, seconds: float = 8.0, threads: int = 4) -> None:
    """Claims of distinct hashes from `threads` stores at once, in one group. The stores
    skip the per-claim WAL flush (it happens after the lock is released, so it is each
    claimer's own wait, not the group's): what is left saturates the group's lock."""
    stores = [PostgresStore(url) for _ in range(threads)]
    for s in stores:
        s.warm(GROUP, RECIPE)
    done = [0] * threads
    stop = time.monotonic() + seconds
    tag = uuid.uuid4().hex[:6]

    def run(k: int) -> None:
        rng = np.random.default_rng(k)
        s = stores[k]
        while time.monotonic() < stop:
            h = int(rng.integers(0, 2**64, dtype=np.uint64))
            r = ImageRecord(GROUP, f"/claims/{tag}/{k}/{done[k]}", RECIPE, h,
                            f"{tag}-{k}-{done[k]}", 1000, 1, 640, 480)
            s.claim(r, 4, s.lookup(GROUP, RECIPE, h, r.digest, 4, limit=8))
            done[k] += 1

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    started = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - started
    held = [x for s in stores for x in s.claim_held_us]
    rate = sum(done) / elapsed
    print(f"  serialised per image: lock held p50 {percentile(held, 50) / 1000:.3f} ms, "
          f"p99 {percentile(held, 99) / 1000:.3f} ms (server clock); {threads} claimers "
          f"saturate at {rate:.0f} claims/s -> <= {1000 / rate:.3f} ms each "
          f"(commit and queueing included); target <= 0.5 ms "
          f"({load()})", flush=True)
    for s in stores:
        s.close()


def join(url: str, work: Path) -> None:
    """A fresh daemon joining the group: spawn -> READY, and its peak RSS."""
    root = work / "joiner" / "drop"
    root.mkdir(parents=True)
    started = time.perf_counter()
    daemon = DaemonUnderTest(work / "joiner", [root], index=url, workers=1,
                             watches=[{"path": str(root), "group": GROUP}],
                             quarantine_dir=str(work / "joiner" / "q"))
    ready = time.perf_counter() - started
    with open(f"/proc/{daemon.proc.pid}/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    daemon.stop()
    shutil.rmtree(work / "joiner", ignore_errors=True)
    print(f"  joining: spawn -> READY {ready:.2f} s, peak RSS {peak / 1024:.0f} MiB "
          f"(targets <= 10 s, <= 1,229 MiB; {load()})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preload", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=2000, help="per daemon")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sizes", default="1000000,10000000",
                    help="sizes for the serialised-time and join parts ('' skips them)")
    ap.add_argument("--setups", default=None,
                    help="comma-separated labels of the set-ups to run (default: all)")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy (from PATH or $PY_SPY) samples each daemon's CPU during "
                         "the bursts into DIR/<set-up>-host<N>.txt (collapsed stacks)")
    ap.add_argument("--pg", default=os.environ.get("DEDUPD_BENCH_PG",
                                                   "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--keep-db", default=None, metavar="NAME",
                    help="use (or create) this scratch database and keep it afterwards: "
                         "repeated runs skip generating the preload")
    args = ap.parse_args()
    name = args.keep_db or f"dedupd_bench_{uuid.uuid4().hex[:8]}"
    url = urlsplit(args.pg)._replace(path=f"/{name}", query="").geturl()
    lax = f"{url}?{LAX}"
    BENCH_DATA.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=BENCH_DATA))
    with psycopg.connect(args.pg, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                            ).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    print(f"machine: {machine()}")
    try:
        files = photo_set("vga", 3 * args.images, [(640, 480)], originals=3 * args.images)
        print(f"files: {describe(files)}")
        secs = grow_pg(url, args.preload)
        print(f"group preloaded with {args.preload:,} rows in {secs:.0f} s", flush=True)
        lite = work / "embedded.sqlite"
        preload_sqlite(lite, url, args.preload)
        setups = [("embedded 1x2", 1, 2, "sqlite"), ("pg 1x2", 1, 2, url),
                  ("pg 2x1", 2, 1, url), ("pg 3x1", 3, 1, url), ("pg 2x1 lax", 2, 1, lax)]
        if args.setups:
            keep = set(args.setups.split(","))
            setups = [s for s in setups if s[0] in keep or s[0] == "embedded 1x2"]
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        best: dict[str, float] = {}
        for rnd in range(1, args.repeat + 1):
            print(f"\nround {rnd}/{args.repeat}", flush=True)
            order = setups[rnd - 1:] + setups[:rnd - 1]  # who runs first rotates
            for label, hosts, workers, index in order:
                run = work / f"run-{rnd}-{label.replace(' ', '_')}"
                run.mkdir()
                if index == "sqlite":
                    index = str(run / "index.sqlite")
                    shutil.copy(lite, index)
                else:
                    clean_pg(url)
                for f in files[:hosts * args.images]:
                    with open(f, "rb") as fh:  # page cache: measure decoding, not the disk
                        fh.read()
                rate = burst(label, run, files[:hosts * args.images], hosts, workers, index,
                             None if index.endswith(".sqlite") else url, args.profile)
                best[label] = max(best.get(label, 0.0), rate)
                shutil.rmtree(run, ignore_errors=True)
        ref = best["embedded 1x2"]
        print(f"\nbest of {args.repeat} (images/s, and x the embedded 1 host x 2 workers):")
        for label, *_ in setups:
            print(f"  {label:<14} {best[label]:8.1f}  {best[label] / ref:5.2f}x")
        if "pg 2x1" in best:
            print(f"  target: pg 2x1 >= 0.8x embedded -> {best['pg 2x1'] / ref:.2f}x")
        if "pg 2x1" in best and "pg 3x1" in best:
            print(f"  target: pg 3x1 >= pg 2x1 -> {best['pg 3x1'] / best['pg 2x1']:.2f}x")
        clean_pg(url)
        for size in sorted(int(s) for s in args.sizes.split(",") if s):
            secs = grow_pg(url, size)
            print(f"\n{size:,} rows in the group (grown in {secs:.0f} s)", flush=True)
            serialised(f"{url}?{LAX}")
            clean_pg(url)
            join(url, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_db:
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
