"""Benchmark 2: `dedupd scan` of a 20k-image folder on all cores vs one (`-j 1`).

    ./dev bench bench_scan [--count 20000] [--workers 2] [--repeat 2]

The set: 0.3-0.7 MP photo-like JPEGs (smaller than bench 1's so 20k stay quick to make
and to scan), 1,250 pictures in 8 orientations plus near-duplicate re-encodings, so
about half the files are duplicates: the scan indexes, matches and groups for real.
Each run is a whole `dedupd scan --json` process on a fresh SQLite index; the best of
`--repeat` runs counts. Target: the `-j WORKERS` rate >= 1.8x the `-j 1` rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_hash import commands  # noqa: E402
from common import (  # noqa: E402
    BENCH_DATA,
    SIZES_SCAN,
    describe,
    machine,
    photo_set,
    verdict,
    warm,
)


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scan_once(folder: Path, workers: int) -> tuple[float, dict, float, float]:
    """One `dedupd scan -j workers` on a fresh index: wall time, JSON summary, CPU seconds
    of the whole process tree and of the main (store) process alone."""
    work = Path(tempfile.mkdtemp(prefix="scan-", dir=BENCH_DATA))
    try:
        cfg = work / "dedupd.yaml"
        cfg.write_text(f"index: {work / 'index.sqlite'}\nquarantine_dir: {work / 'q'}\n")
        cmd = [*commands()["dedupd"][:-1], "--config", str(cfg), "scan", "--json",
               "-j", str(workers), str(folder)]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        # Output to files: the JSON summary lists every duplicate and would fill a pipe.
        with open(work / "out", "w+") as out_fh, open(work / "err", "w+") as err_fh:
            proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, text=True)
            main_cpu = 0.0
            while proc.poll() is None:  # the main process's own CPU, read until it exits
                with contextlib.suppress(OSError, IndexError):
                    main_cpu = proc_cpu(proc.pid)
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
            out_fh.seek(0)
            err_fh.seek(0)
            out, err = out_fh.read(), err_fh.read()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"scan failed ({proc.returncode}): {err[-2000:]}")
        return elapsed, json.loads(out), cpu, main_cpu
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    files = photo_set("scan", args.count, SIZES_SCAN, originals=1250, seed=2)
    folder = files[0].parent
    if len(list(folder.glob("*.jpg"))) != len(files):
        raise SystemExit(f"{folder} holds other files; use a fresh $BENCH_DATA")
    print(f"machine: {machine()}")
    print(f"files: {describe(files[:500])} (sample of 500), {len(files)} in all")
    best: dict[int, float] = {}
    cpu: dict[int, tuple[float, float]] = {}
    for r in range(args.repeat):
        for workers in (1, args.workers):
            warm(files)
            elapsed, summary, total, main_cpu = scan_once(folder, workers)
            if elapsed < best.get(workers, float("inf")):
                best[workers] = elapsed
                cpu[workers] = (total / len(files), main_cpu / len(files))
            print(f"  run {r + 1}/{args.repeat}: -j {workers}: {len(files) / elapsed:7.1f} "
                  f"images/s ({summary['indexed']} indexed, {summary['duplicates']} "
                  f"duplicates, {summary['errors']} errors)", file=sys.stderr, flush=True)
    one, many = len(files) / best[1], len(files) / best[args.workers]
    print(f"\nscan of {len(files)} files, whole process, best of {args.repeat}")
    print(f"  -j 1        {one:8.1f} images/s")
    print(f"  -j {args.workers:<8} {many:8.1f} images/s  ({many / one:.2f}x)")
    tree, main_only = cpu[args.workers]
    cap = min(args.workers / tree, 1 / main_only)
    print(f"  CPU per image: -j 1 {1000 * cpu[1][0]:.2f} ms; -j {args.workers} "
          f"{1000 * tree:.2f} ms in all, {1000 * main_only:.2f} ms in the main process")
    print(f"  so with {args.workers} free cores -j {args.workers} could reach {cap:.0f} images/s "
          f"({cap * cpu[1][0]:.2f}x the -j 1 CPU-bound rate)")
    ok = many >= 1.8 * one
    print(f"\ntargets\n  {verdict(ok)}  -j {args.workers} >= 1.8x -j 1")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
