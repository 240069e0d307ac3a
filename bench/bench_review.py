"""The review page at 100k quarantine entries: how long a page takes over HTTP.

Builds an embedded store holding N quarantine entries (default 100,000) and their image
records (the newest page's files are real JPEGs, for the thumbnails), starts the real
`dedupd review` server and times, over HTTP, the first page, a page in the middle, the
last page, four filtered pages (two by flag: a mirror image or rotation in 1 of 500
entries, low information in 1 of 200), and the first page's thumbnails (cold, then cached).
Beside it, the reference: what a person does today, `dedupd quarantine list --json`.

Target: a page in well under a second at 100k entries, the same at any depth.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, encode_jpeg, machine, percentile, photo, verdict  # noqa: E402

sys.path.insert(0, str(ROOT))
from dedupd.store import ImageRecord, open_store  # noqa: E402

ROOTS = ("/srv/datasets/a/train", "/srv/datasets/a/test", "/srv/incoming")


def build(tmp: Path, n: int) -> Path:
    """The store, with n entries; the newest 50 name real files under tmp/files."""
    db = tmp / "index.sqlite"
    store = open_store(str(db))
    files = tmp / "files"
    files.mkdir()
    t0 = time.time() - n * 30
    records, entries = [], []
    for i in range(n):
        root = ROOTS[i % 3]
        real = i >= n - 50
        q = str(files / f"q{i}.jpg") if real else f"{tmp}/quarantine{root}/{i}.jpg"
        kept = str(files / f"k{i}.jpg") if real else f"{root}/kept{i}.jpg"
        orig = f"{root}/img{i}.jpg"
        if real:
            jpeg = encode_jpeg(photo(i, 1600, 1200), 88)
            Path(kept).write_bytes(jpeg)
            Path(q).write_bytes(jpeg)
        for path, status in ((q, "quarantined"), (kept, "kept")):
            records.append(ImageRecord(scope=root, path=path, recipe="dhash:8:fast:area:v1",
                                       hash=i, digest=f"{i:064x}", file_size=500_000 + i,
                                       mtime_ns=0, width=1600, height=1200, status=status))
        entries.append((2 * i + 1, orig, q, kept, i % 9, f"{i:016x}",
                        "default" if i % 4 else "strict", t0 + 30 * i,
                        ("hflip", "rot90")[i % 2] if i % 500 == 7 else None, i % 200 == 3))
    store.insert_many(records)
    store.close()
    conn = sqlite3.connect(db)  # the journal in one transaction (add_quarantine commits each)
    with conn:
        conn.executemany(
            "INSERT INTO quarantine (image_id, original_path, quarantine_path, matched_path, "
            "distance, hash, policy, reason, created, state, transform, low_information) "
            "VALUES (?,?,?,?,?,?,?,'duplicate',?,'done',?,?)", entries)
    conn.close()
    cfg = tmp / "dedupd.yaml"
    cfg.write_text(json.dumps({"index": str(db), "quarantine_dir": str(tmp / "quarantine"),
                               "watches": [{"path": r} for r in ROOTS]}))
    return cfg


def timed_get(url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp:
        body = resp.read()
    return time.perf_counter() - start, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-review-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        cfg = build(tmp, args.entries)
        print(f"built a store with {args.entries:,} quarantine entries in "
              f"{time.perf_counter() - t:.1f} s")
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
        server = subprocess.Popen(
            [PYTHON, "-m", "dedupd", "--config", str(cfg), "--log", "stderr", "review",
             "--json", "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = json.loads(server.stdout.readline())["url"]  # type: ignore[union-attr]
            n = args.entries
            pages = {
                "first page (50 pairs)": "",
                "middle page": f"?before={n // 2}",
                "last page": "?before=40",
                "filtered: root + distance 2-3": "?root=/srv/incoming&dmin=2&dmax=3",
                "filtered: policy + 2 days": "?policy=strict&since=" + time.strftime(
                    "%Y-%m-%d", time.gmtime(time.time() - 86400 * 3)) + "&until="
                    + time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400 * 2)),
                "filtered: flag transform (1/500)": "?flag=transform",
                "filtered: flag low information": "?flag=low_information",
            }
            timed_get(url)  # warm the server's first-request setup
            print(f"\n{'request':34} {'p50 ms':>8} {'p99 ms':>8} {'pairs':>6} {'KiB':>6}")
            worst = 0.0
            for label, query in pages.items():
                times, body = [], b""
                for _ in range(args.repeat):
                    took, body = timed_get(url + query)
                    times.append(took * 1000)
                worst = max(worst, percentile(times, 99))
                pairs = body.count(b'class="pair"')
                print(f"{label:34} {percentile(times, 50):8.1f} {percentile(times, 99):8.1f} "
                      f"{pairs:6} {len(body) / 1024:6.0f}")
            print(f"every page p99 <= 500 ms: {verdict(worst <= 500)}")
            ids = [n - i for i in range(50)]  # the first page: the highest ids
            for label in ("thumbnails, cold (100 files, 1600x1200)", "thumbnails, cached"):
                start = time.perf_counter()
                for entry_id in ids:
                    for side in ("quarantined", "kept"):
                        timed_get(f"{url}thumb/{entry_id}/{side}")
                took = time.perf_counter() - start
                print(f"{label:34} {took * 1000 / 100:8.1f} ms per thumbnail")
        finally:
            server.terminate()
            server.wait(20)
        start = time.perf_counter()
        out = subprocess.run([PYTHON, "-m", "dedupd", "--config", str(cfg), "quarantine",
                              "list", "--json"], capture_output=True, env=env, check=True)
        took = time.perf_counter() - start
        print(f"\nreference: `dedupd quarantine list --json` of all {n:,}: {took:.2f} s, "
              f"{len(out.stdout) / 1e6:.0f} MB of text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
