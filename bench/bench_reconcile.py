"""Benchmark 6: reconciling a big root against its store, beside the bare walk.

    ./dev bench bench_reconcile [--sizes 100000,1000000] [--changed 50000] [--no-daemon]

A tree of `size` files (1,000 per directory, names `dNNNN/fNNNNNNN.jpg`, empty except
`--changed` tiny real JPEGs in `jpeg/`), and a SQLite store that already knows every
file (size and mtime as on disk), are generated once in $BENCH_DATA. Per size, in one
run, warm cache:

1. **dedupd's reconcile with nothing to do** (`Daemon.reconcile`, in process, the full
   per-file comparison of a start-up) and its periodic safety net (trigger `interval`:
   directories whose mtime did not change are only listed), beside the bare Python
   walk (`os.scandir` + `lstat` of every entry) and `find -printf '%s %T@ %p'` (C).
   Target: full <= 3x the bare walk; the safety net at 10M files (extrapolated
   linearly) averages <= 2% of a core at the default hourly interval.
2. **memory during a reconcile of the root with every file changed** (an empty store:
   every file is queued), the queue drained by a thread that takes each path and
   marks it done (the reconcile's own memory, not hashing's): peak RSS growth, target
   <= +50 MiB at 1M files.
3. **latency of live files during a reconcile** (the real daemon, `dedupd run`, on the
   largest tree, the store with `--changed` records out of date so the start-up
   reconcile queues them for hashing): small JPEGs renamed into the root one at a time
   while that work is queued, arrival -> logged decision, p50/p99, against the same
   drops on the idle daemon afterwards. Target: p99 <= 2x the idle p99.

10M files are extrapolated, not measured: they would take 10M of this machine's 16M
inodes, which other people share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cv2  # noqa: E402
from common import BENCH_DATA, DaemonUnderTest, machine, percentile, rss_kb, verdict  # noqa: E402

from dedupd.config import Config, Policy, Watch  # noqa: E402
from dedupd.hashing import Recipe  # noqa: E402
from dedupd.store import ImageRecord, open_store  # noqa: E402

PER_DIR = 1000
TEN_M = 10_000_000


def tiny_jpeg(seed: int, width: int = 64, height: int = 48) -> bytes:
    """A small real JPEG whose dHash is random (a smooth random field, upsampled)."""
    rng = np.random.default_rng(seed)
    field = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    img = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return buf.tobytes()


def make_tree(size: int, changed: int) -> Path:
    """BENCH_DATA/reconcile-SIZE: `size` files, `changed` of them tiny JPEGs. Made once."""
    root = BENCH_DATA / f"reconcile-{size}"
    done = BENCH_DATA / f"reconcile-{size}.done"
    if done.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    print(f"generating a tree of {size:,} files in {root} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    jpegs = min(changed, size)
    for i in range(size - jpegs):
        folder = root / f"d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            folder.mkdir(parents=True)
        with open(folder / f"f{i:07d}.jpg", "wb"):
            pass
    for i in range(jpegs):
        folder = root / "jpeg" / f"j{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            folder.mkdir(parents=True)
        (folder / f"j{i:07d}.jpg").write_bytes(tiny_jpeg(i))
    done.write_text(f"{size} {jpegs}\n")
    print(f"  done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return root


def make_store(root: Path, size: int) -> Path:
    """A SQLite store knowing every file of the tree (fake hashes, true size and mtime)."""
    path = BENCH_DATA / f"reconcile-{size}.sqlite"
    if path.exists():
        return path
    print(f"indexing {size:,} files into {path} ...", file=sys.stderr, flush=True)
    store = open_store(str(path) + ".part")
    recipe = Recipe().key
    rng = np.random.default_rng(size)
    batch: list[ImageRecord] = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            batch.append(ImageRecord(scope=str(root), path=p, recipe=recipe,
                                     hash=int(rng.integers(0, 2**63)), digest="-",
                                     file_size=st.st_size, mtime_ns=st.st_mtime_ns,
                                     width=64, height=48))
            if len(batch) == 50_000:
                store.insert_many(batch)
                batch.clear()
    store.insert_many(batch)
    store.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(path) + ".part" + suffix):
            os.replace(str(path) + ".part" + suffix, str(path) + suffix)
    for snap in BENCH_DATA.glob(f"reconcile-{size}.sqlite.part.hamming-*"):
        snap.unlink()
    return path


def bare_walk(root: Path) -> int:
    """The floor in Python: every directory listed, every entry lstat'ed."""
    n, stack = 0, [str(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    n += 1
    return n


def find_walk(root: Path) -> int:
    out = subprocess.run(["find", str(root), "-printf", "%s %T@ %p\n"], check=True,
                         stdout=subprocess.PIPE).stdout
    return out.count(b"\n")


def timed(fn, *args) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    """(wall s, CPU s of this process, result). find's CPU is its own, as a child."""
    c0, w0, ch0 = time.process_time(), time.perf_counter(), os.times()
    result = fn(*args)
    w1, c1, ch1 = time.perf_counter(), time.process_time(), os.times()
    child = (ch1.children_user - ch0.children_user) + (ch1.children_system - ch0.children_system)
    return w1 - w0, c1 - c0 + child, result


def config_for(root: Path, index: Path, workdir: Path) -> Config:
    return Config(source="bench", index=str(index), quarantine_dir=workdir / "q",
                  watches=(Watch(root),), policies={"default": Policy("default")})


def best_of(repeat: int, fn, *args) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    runs = [timed(fn, *args) for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def walk_costs(size: int, root: Path, index: Path, repeat: int) -> dict[str, float]:
    from dedupd.daemon import Daemon

    print(f"\n## {size:,} files, nothing changed (warm cache, best of {repeat})")
    with tempfile.TemporaryDirectory(dir=BENCH_DATA) as tmp:
        daemon = Daemon(config_for(root, index, Path(tmp)))
        try:
            bare_walk(root)  # warm the dentry and inode caches
            rows = {
                "bare os.scandir + lstat walk": best_of(repeat, bare_walk, root),
                "find -printf (C)": best_of(repeat, find_walk, root),
                "dedupd reconcile (full)": best_of(repeat, daemon.reconcile, root),
                "dedupd reconcile (interval)": best_of(
                    repeat, lambda: daemon.reconcile(root, trigger="interval")),
            }
        finally:
            daemon.store.close()
    bare, bare_cpu = rows["bare os.scandir + lstat walk"][:2]
    print("(on a shared machine compare CPU: wall time includes waiting for a core)")
    print(f"| {'':30} | wall s | CPU s | µs/file (CPU) | wall vs bare | CPU vs bare | result |")
    print(f"|{'-' * 32}|-------:|------:|--------------:|-------------:|------------:|--------|")
    for name, (wall, cpu, result) in rows.items():
        what = result if isinstance(result, int) else {
            k: v for k, v in dict(result).items() if k in ("seen", "queued", "forgotten")}
        print(f"| {name:30} | {wall:6.2f} | {cpu:5.2f} | {cpu / size * 1e6:13.2f} | "
              f"{wall / bare:11.2f}x | {cpu / bare_cpu:10.2f}x | {what} |")
    return {name: wall for name, (wall, _, _) in rows.items()} | {
        name + " cpu": cpu for name, (_, cpu, _) in rows.items()}


def reconcile_memory(size: int, root: Path, repeat: int) -> float:
    """Peak RSS growth (MiB) while reconciling the root against an empty store."""
    from dedupd.daemon import Daemon

    with tempfile.TemporaryDirectory(dir=BENCH_DATA) as tmp:
        daemon = Daemon(config_for(root, Path(tmp) / "empty.sqlite", Path(tmp)))
        stop = threading.Event()
        taken = [0]

        def drain() -> None:
            while not stop.is_set():
                path = daemon.queue.get(0.1)
                if path is not None:
                    daemon.queue.done(path)
                    taken[0] += 1

        peak = [0]

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kb(os.getpid()))
                time.sleep(0.05)

        threads = [threading.Thread(target=drain), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        before = rss_kb(os.getpid())
        peak[0] = before
        started = time.perf_counter()
        counts = daemon.reconcile(root)
        elapsed = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join()
        daemon.store.close()
    grown = (peak[0] - before) / 1024
    print(f"\n## memory: {size:,} files, all changed (an empty store), queue drained as "
          f"fast as it fills")
    print(f"{counts['queued']:,} queued in {elapsed:.1f} s; RSS {before / 1024:.0f} MiB "
          f"before, peak +{grown:.1f} MiB during: {verdict(grown <= 50)} (target <= +50 MiB)")
    return grown


class Watching(DaemonUnderTest):
    """DaemonUnderTest that also notes the reconcile events."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.reconciles: list[dict] = []
        super().__init__(*args, **kwargs)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        decisions = ("image_accepted", "duplicate_logged", "image_rejected")
        for raw in self.proc.stderr:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            event = obj.get("event")
            if event == "started":
                self.started.set()
            elif event in ("reconcile_started", "reconcile_finished"):
                self.reconciles.append(obj)
            elif event in decisions:
                with self._cond:
                    self.decided[obj["path"]] = obj["ts"]
                    self.order.append(obj["path"])
                    self._cond.notify_all()


def live_latency(size: int, root: Path, index: Path, changed: int, drops: int) -> None:
    from common import event_time

    print(f"\n## live files during a reconcile: {size:,} files, {changed:,} changed, "
          f"{drops} files dropped one at a time")
    with tempfile.TemporaryDirectory(dir=BENCH_DATA) as tmp:
        work = Path(tmp)
        db = work / "state" / "index.sqlite"
        db.parent.mkdir()
        shutil.copy(index, db)
        conn = sqlite3.connect(db)
        conn.execute("UPDATE images SET mtime_ns = mtime_ns - 1 WHERE path LIKE ?",
                     (f"{root}/jpeg/%",))
        conn.commit()
        conn.close()
        live = root / "live"
        shutil.rmtree(live, ignore_errors=True)
        live.mkdir()
        staging = work / "staging"
        staging.mkdir()
        pictures = [tiny_jpeg(10_000_000 + i, 160, 120) for i in range(2 * drops)]
        daemon = Watching(work, [root], policies={"default": {"action": "log"}},
                          reconcile_interval=0)
        try:
            def drop(batch: range, tag: str) -> list[float]:
                latencies = []
                for i in batch:
                    src = staging / f"{tag}{i:05d}.jpg"
                    src.write_bytes(pictures[i])
                    dst = live / src.name
                    t0 = time.time()
                    os.rename(src, dst)
                    if not daemon.wait_decided([str(dst)], 60):
                        raise SystemExit(f"{dst} not decided within 60 s")
                    latencies.append(event_time(daemon.decided[str(dst)]) - t0)
                    time.sleep(0.02)
                return latencies

            busy = drop(range(drops), "busy")
            queued_left = sum(1 for e in daemon.reconciles if e["event"] == "reconcile_finished")
            deadline = time.monotonic() + 3600
            while not any(e["event"] == "reconcile_finished" for e in daemon.reconciles):
                if time.monotonic() > deadline:
                    raise SystemExit("the start-up reconcile did not finish within an hour")
                time.sleep(0.5)
            jpegs = [str(p) for p in (root / "jpeg").rglob("*.jpg")]
            daemon.wait_decided(jpegs, 3600)
            during_all = queued_left == 0
            idle = drop(range(drops, 2 * drops), "idle")
            finished = next(e for e in daemon.reconciles if e["event"] == "reconcile_finished")
        finally:
            daemon.stop()
            shutil.rmtree(live, ignore_errors=True)
    p50b, p99b = percentile(busy, 50) * 1e3, percentile(busy, 99) * 1e3
    p50i, p99i = percentile(idle, 50) * 1e3, percentile(idle, 99) * 1e3
    print(f"start-up reconcile: {finished.get('message')}")
    print(f"drops {'all' if during_all else 'not all'} made before the reconcile finished")
    print("| | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|")
    print(f"| during the reconcile ({changed:,} queued) | {p50b:.1f} | {p99b:.1f} | "
          f"{max(busy) * 1e3:.1f} |")
    print(f"| idle | {p50i:.1f} | {p99i:.1f} | {max(idle) * 1e3:.1f} |")
    print(f"p99 during / idle = {p99b / p99i:.2f}: {verdict(p99b <= 2 * p99i)} (target <= 2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--changed", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--drops", type=int, default=100)
    parser.add_argument("--no-daemon", action="store_true", help="skip the latency part")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the live-latency part (at the largest size)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# bench_reconcile: {machine()}")
    print(f"{PER_DIR} files per directory; the store: SQLite, records for every file")
    if args.latency_only:
        big = max(sizes)
        root = make_tree(big, args.changed)
        live_latency(big, root, make_store(root, big), args.changed, args.drops)
        return 0
    results = {}
    for size in sizes:
        root = make_tree(size, args.changed)
        index = make_store(root, size)
        results[size] = walk_costs(size, root, index, args.repeat)
    big = max(sizes)
    r = results[big]
    per_file = r["dedupd reconcile (full) cpu"] / big
    net = r["dedupd reconcile (interval) cpu"] / big
    bare = r["bare os.scandir + lstat walk cpu"] / big
    print(f"\n## 10M files, extrapolated from {big:,} (linear, CPU seconds)")
    print(f"bare walk {bare * TEN_M:.0f} s; full reconcile {per_file * TEN_M:.0f} s "
          f"({per_file / bare:.2f}x: {verdict(per_file <= 3 * bare)}, target <= 3x); "
          f"periodic safety net {net * TEN_M:.1f} s of CPU per run = "
          f"{net * TEN_M / 3600 * 100:.2f}% of a core at the hourly default: "
          f"{verdict(net * TEN_M / 3600 <= 0.02)} (target <= 2%)")
    if not args.no_memory:
        reconcile_memory(big, make_tree(big, args.changed), args.repeat)
    if not args.no_daemon:
        live_latency(big, make_tree(big, args.changed), make_store(make_tree(
            big, args.changed), big), args.changed, args.drops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
