"""Benchmark 4: end to end through the real daemon, from a file's arrival to its logged
decision, against bench 1's one-core `dedupd hash` rate times the cores the daemon uses.

    ./dev bench bench_e2e [--burst 2000] [--single 200]

The daemon runs as a subprocess (`dedupd run --log json`, default workers = all cores)
on a temporary root; every decision is one JSON line on its stderr whose `ts` is the
decision time. Files arrive the drop-folder way: linked into the root under an ignored
temporary name first (`.NAME.tmp`; no decode work), then renamed to their final name,
which is the "file closed" instant. Two phases:

  burst    all `--burst` 1-2 MP JPEGs renamed in at once: throughput from the first
           arrival to the last decision, latency arrival -> decision p50/p99; best of
           `--repeat` runs, each on a fresh daemon and store, as the baseline is best of
           `--repeat`
  single   `--single` more files one at a time, each after the previous was decided:
           the latency a user sees (p50/p99)

All pictures are distinct (nothing is quarantined): this measures hashing and deciding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_hash import commands, run_once  # noqa: E402
from common import (  # noqa: E402
    BENCH_DATA,
    SIZES_SMALL,
    DaemonUnderTest,
    describe,
    machine,
    percentile,
    photo_set,
    verdict,
    warm,
)


def one_core_hash_rate(files: list[Path], repeat: int) -> tuple[float, float]:
    """Bench 1's measure: `dedupd hash` as a whole process pinned to one core, best run;
    and its CPU seconds per image (which load on the machine hardly changes)."""
    cmd = commands()["dedupd"]
    runs = []
    for _ in range(repeat):
        warm(files)
        runs.append(run_once(cmd, [str(f) for f in files]))
    return len(files) / min(r[0] for r in runs), min(r[2] for r in runs) / len(files)


def stage(files: list[Path], root: Path) -> list[tuple[Path, Path]]:
    """Hard-link each file into root under an ignored temporary name; (tmp, final) pairs."""
    pairs = []
    for f in files:
        tmp, final = root / f".{f.name}.tmp", root / f.name
        os.link(f, tmp)
        pairs.append((tmp, final))
    return pairs


def burst_run(daemon: DaemonUnderTest, root: Path, burst: list[Path], cores: int,
              cpu1: float, run: int, runs: int) -> float:
    """All files renamed in at once; prints the run's figures, returns its throughput."""
    pairs = stage(burst, root)
    warm(burst)
    time.sleep(1.0)  # let the daemon read the link events (ignored names) first
    cpu0 = daemon.cpu_seconds()
    arrived: dict[str, float] = {}
    for tmp, final in pairs:
        os.rename(tmp, final)
        arrived[str(final)] = time.time()
    if not daemon.wait_decided(list(arrived), 600):
        missing = len([p for p in arrived if p not in daemon.decided])
        raise SystemExit(f"burst: {missing} files never decided")
    cpu = daemon.cpu_seconds() - cpu0
    first, last = min(arrived.values()), max(daemon.decided[p] for p in arrived)
    throughput = len(arrived) / (last - first)
    lat = [1000 * (daemon.decided[p] - t) for p, t in arrived.items()]
    print(f"\nburst {run}/{runs}: {len(arrived)} files, daemon with {cores} workers "
          f"(decisions: {daemon.kinds})")
    print(f"  throughput {throughput:.1f} images/s (first arrival -> last decision "
          f"{last - first:.2f} s); daemon CPU {1000 * cpu / len(arrived):.2f} ms/image")
    print(f"  latency arrival -> decision: p50 {percentile(lat, 50):.0f} ms, "
          f"p99 {percentile(lat, 99):.0f} ms (queueing included)")
    print(f"  CPU per image: daemon {1000 * cpu / len(arrived):.2f} ms vs `dedupd hash` "
          f"{1000 * cpu1:.2f} ms ({cpu / len(arrived) / cpu1:.2f}x); with {cores} free cores "
          f"that caps the daemon at {cores / (cpu / len(arrived)):.0f} images/s")
    return throughput


def single_run(daemon: DaemonUnderTest, root: Path, single: list[Path],
               results: dict[str, bool]) -> None:
    """Files one at a time, each after the previous was decided: the latency a user sees."""
    pairs = stage(single, root)
    warm(single)
    time.sleep(0.5)
    lat = []
    for tmp, final in pairs:
        os.rename(tmp, final)
        t = time.time()
        if not daemon.wait_decided([str(final)], 30):
            raise SystemExit(f"{final} was not decided within 30 s")
        lat.append(1000 * (daemon.decided[str(final)] - t))
    print(f"\none at a time, {len(lat)} files: latency arrival -> decision p50 "
          f"{percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
          f"max {max(lat):.1f} ms")
    results["one at a time: p50 latency <= 25 ms"] = percentile(lat, 50) <= 25
    print(f"\ndaemon RSS at the end: {daemon.rss_kb() / 1024:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of the one-core baseline and of the burst (best counts)")
    args = parser.parse_args()

    files = photo_set("small", args.burst + args.single, SIZES_SMALL, originals=300)
    burst, single = files[:args.burst], files[args.burst:]
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {machine()}")
    print(f"files: {describe(files)}")

    rate1, cpu1 = one_core_hash_rate(burst, args.repeat)
    print(f"\none core, `dedupd hash` over the {len(burst)} burst files: {rate1:.1f} images/s "
          f"({1000 * cpu1:.2f} ms CPU/image)")

    results: dict[str, bool] = {}
    target = 0.8 * rate1 * cores
    best = 0.0
    for run in range(1, args.repeat + 1):
        # A fresh daemon and store each run: the same files must be new to it.
        work = Path(tempfile.mkdtemp(prefix="e2e-", dir=BENCH_DATA))
        root = work / "root"
        root.mkdir()
        daemon = DaemonUnderTest(work, [root])
        try:
            throughput = burst_run(daemon, root, burst, cores, cpu1, run, args.repeat)
            best = max(best, throughput)
            if run == args.repeat:
                single_run(daemon, root, single, results)
        finally:
            daemon.stop()
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nburst, best of {args.repeat}: {best:.1f} images/s; target: >= 80% of "
          f"{rate1:.1f}/s x {cores} cores = {target:.1f} images/s -> {best / (rate1 * cores):.0%} "
          "of it")
    results[f"burst throughput >= 80% of one-core hash rate x {cores}"] = best >= target

    print("\ntargets")
    for name, ok in results.items():
        print(f"  {verdict(ok)}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
