"""Benchmark 1: hash throughput on one core, dedupd vs what a user would otherwise run.

    ./dev bench bench_hash [--small 1000] [--large 300] [--repeat 3] [--recipes]

Each contender is a whole process (interpreter start, imports, output included), pinned
to CPU 0, hashing the same photo-like JPEGs in the same run:

  dedupd      `dedupd hash FILE...` (default recipe: reduced JPEG decode + area resize)
  seed        bench/ref_seed.py: cv2.imread colour + cvtColor + bilinear resize
  imagehash   bench/ref_imagehash.py: imagehash.dhash on PIL (full decode)
  floor       bench/ref_floor.py: a bare 1/8 reduced-decode + area-resize loop

`--recipes` races dedupd's own recipes instead, side by side on the 1-2 MP set (through
bench/ref_recipe.py, the library without the CLI): v1 (no border trimming), v2 (the
default, what `dedupd hash` runs) and v2 with the second look's signature (what the
daemon, `scan` and `check` compute); each must stay within 10% of v1's throughput.
`--against DIR` races another tree's recipes too (`was v1`...), to measure a change in
one run: `git archive HEAD dedupd bench | tar -x -C DIR` before making it.

Runs are interleaved and repeated; the best of `--repeat` is reported, as images per
wall-clock second and per CPU second of the process. The machine is shared: a pinned
process that waits for its core loses wall time but no CPU time, so on a loaded machine
the CPU figures are the ones to trust (a target counts as met on either).

Then the accuracy of the fast decode: the `dhash` of the reduced decode must be within
2 bits of the full-decode `dhash` on at least 90% of the images.

Last, context rather than a target: the ratios depend on how much entropy-coded data a
picture carries. The floor (and dedupd, which runs at it) pays for Huffman decoding of
every coefficient, while the full-decode contenders also pay per pixel (IDCT, colour
conversion, resize). So `--sweep` re-saves the first 300 1-2 MP pictures at other JPEG
qualities and races all four again on each: fewer bits per pixel, larger ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import (  # noqa: E402
    PYTHON,
    SIZES_LARGE,
    SIZES_SMALL,
    describe,
    machine,
    photo_set,
    reencoded,
    verdict,
    warm,
)

from dedupd.hashing import Recipe, hamming, hash_file  # noqa: E402

HERE = Path(__file__).resolve().parent
DEDUPD = Path(PYTHON).with_name("dedupd")


def commands() -> dict[str, list[str]]:
    dedupd = [str(DEDUPD)] if DEDUPD.exists() else [PYTHON, "-m", "dedupd"]
    return {
        "dedupd": [*dedupd, "hash"],
        "seed": [PYTHON, str(HERE / "ref_seed.py")],
        "imagehash": [PYTHON, str(HERE / "ref_imagehash.py")],
        "floor": [PYTHON, str(HERE / "ref_floor.py")],
        # --recipes: dedupd's library on each recipe, side by side (ref_recipe.py)
        **{f"lib {r}": [PYTHON, str(HERE / "ref_recipe.py"), r] for r in RECIPES},
        # --against DIR: that tree's library (its ref_recipe.py imports its own dedupd)
        **{f"was {r}": [PYTHON, str(Path(AGAINST[0]) / "bench" / "ref_recipe.py"), r]
           for r in RECIPES if AGAINST},
    }


RECIPES = ("v1", "v2", "v2+look")
AGAINST: list[str] = []  # --against DIR
CONTENDERS = ["dedupd", "seed", "imagehash", "floor"]


def pin_to_cpu0() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str], files: list[str]) -> tuple[float, list[str], float]:
    """Wall time of one whole process over files; its stdout lines; its CPU seconds."""
    env = {k: v for k, v in os.environ.items() if k != "DEDUPD_CONFIG"}
    cpu = children_cpu()
    started = time.perf_counter()
    proc = subprocess.run([*cmd, *files], capture_output=True, text=True, env=env,
                          preexec_fn=pin_to_cpu0, check=False)
    elapsed = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[-1]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    if len(lines) != len(files):
        raise SystemExit(f"{cmd[-1]}: {len(lines)} lines of output for {len(files)} files")
    return elapsed, lines, cpu


def race(files: list[str], repeat: int, contenders: list[str]
         ) -> tuple[dict[str, float], dict[str, float]]:
    """Best-of-`repeat` images per wall second and per CPU second for each contender, runs
    interleaved so load hits all alike. On a shared machine the CPU figure is the steady
    one: a pinned process waits for its core while others run, and wall time counts it."""
    cmds = commands()
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    outputs: dict[str, list[str]] = {}
    for r in range(repeat):
        for name in contenders:
            warm([Path(f) for f in files])
            elapsed, lines, cpu = run_once(cmds[name], files)
            outputs[name] = lines
            best[name] = min(best.get(name, float("inf")), elapsed)
            best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
            print(f"  run {r + 1}/{repeat} {name:<10} {len(files) / elapsed:8.1f} images/s",
                  file=sys.stderr, flush=True)
    if "dedupd" in outputs and "floor" in outputs:
        # Same hash bits where the recipe is the same: the floor is dedupd's default recipe.
        pairs = zip(outputs["dedupd"], outputs["floor"], strict=True)
        agree = sum(a.split()[0] == b.split()[0] for a, b in pairs)
        print(f"  dedupd and the floor print the same hash for {agree}/{len(files)} files",
              file=sys.stderr)
    return ({name: len(files) / t for name, t in best.items()},
            {name: len(files) / t for name, t in best_cpu.items()})


def report(title: str, rates: dict[str, float], cpu_rates: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'':<11}{'wall clock':>28}   {'CPU time':>26}")
    print(f"  {'contender':<11}{'images/s':>10}{'ms/image':>9}{'dedupd is':>10}   "
          f"{'images/s':>9}{'ms/image':>9}{'dedupd is':>10}")
    for name, rate in rates.items():
        cpu = cpu_rates[name]
        print(f"  {name:<11}{rate:10.1f}{1000 / rate:9.2f}{rates['dedupd'] / rate:9.2f}x   "
              f"{cpu:9.1f}{1000 / cpu:9.2f}{cpu_rates['dedupd'] / cpu:9.2f}x")


def passes(rates: dict[str, float], cpu_rates: dict[str, float], other: str, factor: float
           ) -> bool:
    """A ratio target, met on wall clock or on CPU time (the latter when the machine is
    loaded: see race())."""
    return max(rates["dedupd"] / rates[other], cpu_rates["dedupd"] / cpu_rates[other]) >= factor


def accuracy(paths: list[Path]) -> tuple[float, float, int]:
    """Share of images whose fast-decode dhash is within 2 bits of the full-decode one."""
    dists = [hamming(hash_file(p, Recipe(decode="fast")).hash,
                     hash_file(p, Recipe(decode="full")).hash) for p in paths]
    within = sum(d <= 2 for d in dists) / len(dists)
    return within, sum(dists) / len(dists), max(dists)


def sweep(sources: list[Path], qualities: list[int], repeat: int) -> None:
    """The same pictures at other JPEG qualities: how the ratios move with bits per pixel."""
    rows = []
    for quality in qualities:
        files = reencoded(f"small-q{quality}", sources, quality)
        print(f"\nquality {quality}: {describe(files)}", file=sys.stderr, flush=True)
        _, cpu = race([str(p) for p in files], repeat, CONTENDERS)
        rows.append((quality, describe(files).split(", ")[-1], cpu))
    print(f"\nthe first {len(sources)} 1-2 MP pictures re-saved at other qualities "
          f"(CPU time, best of {repeat}; context, not targets)")
    print(f"  {'quality':>7} {'bits/pixel':>15} {'dedupd/s':>9} {'vs seed':>8} "
          f"{'vs imagehash':>13} {'floor vs seed':>14}")
    for quality, bpp, cpu in rows:
        print(f"  {quality:>7} {bpp:>15} {cpu['dedupd']:9.1f} "
              f"{cpu['dedupd'] / cpu['seed']:7.2f}x {cpu['dedupd'] / cpu['imagehash']:12.2f}x "
              f"{cpu['floor'] / cpu['seed']:13.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000, help="1-2 MP files (default 1000)")
    parser.add_argument("--large", type=int, default=300, help="8-12 MP files (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (best wins)")
    parser.add_argument("--recipes", action="store_true",
                        help="only race dedupd's recipes (v1, v2, v2 with the second look's "
                             "signature) against `dedupd hash` and the floor, 1-2 MP set")
    parser.add_argument("--against", metavar="DIR",
                        help="with --recipes: also race the recipes of the dedupd tree in DIR "
                             "(e.g. the commit before a change, from git archive)")
    parser.add_argument("--sweep", default="60,75,95",
                        help="JPEG qualities to re-save 300 1-2 MP pictures at and race again "
                             "(context; '' skips)")
    args = parser.parse_args()

    small = photo_set("small", args.small, SIZES_SMALL, originals=300)
    print(f"machine: {machine()}")
    print("one core (CPU 0), whole processes, best of", args.repeat)
    results: dict[str, bool] = {}
    if args.recipes:
        print(f"\n1-2 MP set: {describe(small)}", flush=True)
        if args.against:
            AGAINST.append(args.against)
            print(f"against: {args.against} ('was')")
        trees = ["lib", *(["was"] if args.against else [])]
        names = ["dedupd", *(f"{t} {r}" for t in trees for r in RECIPES), "floor"]
        rates, cpu = race([str(p) for p in small], args.repeat, names)
        report("1-2 MP JPEGs, dedupd's recipes side by side ('dedupd is' = dedupd hash, v2)",
               rates, cpu)
        for tree in trees:
            for r in RECIPES[1:]:
                wall, on_cpu = (x[f"{tree} {r}"] / x[f"{tree} v1"] for x in (rates, cpu))
                print(f"  {tree} {r} vs {tree} v1 throughput: wall clock {wall:.3f}x, "
                      f"CPU time {on_cpu:.3f}x")
                if tree == "lib":
                    results[f"{r} within 10% of v1's throughput"] = max(wall, on_cpu) >= 0.90
        print("\ntargets")
        for name, ok in results.items():
            print(f"  {verdict(ok)}  {name}")
        return 0 if all(results.values()) else 1
    large = photo_set("large", args.large, SIZES_LARGE, originals=40, seed=1)

    # The targets: (set, its files, (contender, ratio dedupd must reach)...).
    for label, files, goals in (("1-2 MP", small, (("seed", 3), ("imagehash", 5))),
                                ("8-12 MP", large, (("seed", 6),))):
        print(f"\n{label} set: {describe(files)}", flush=True)
        rates, cpu = race([str(p) for p in files], args.repeat, CONTENDERS)
        report(f"{label} JPEGs", rates, cpu)
        for other, factor in goals:
            name = "seed recipe" if other == "seed" else other
            results[f"{label}: dedupd >= {factor}x {name}"] = passes(rates, cpu, other, factor)
        results[f"{label}: dedupd within 5% of the bare floor"] = passes(rates, cpu, "floor",
                                                                         0.95)

    distinct = small[:300] + large[:40]  # the original pictures
    within, mean, worst = accuracy(distinct)
    print(f"\nfast vs full decode, {len(distinct)} distinct pictures: {within:.1%} within 2 bits "
          f"(mean {mean:.2f} bits, worst {worst})")
    results["fast decode within 2 bits of full on >= 90%"] = within >= 0.90

    if args.sweep:
        sweep(small[:300], [int(q) for q in args.sweep.split(",")], min(args.repeat, 2))

    print("\ntargets")
    for name, ok in results.items():
        print(f"  {verdict(ok)}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
