"""Shared by the benchmarks: photo-like test JPEGs (cached outside git), machine facts.

Flat colour or pure noise would mislead: JPEG entropy-decode cost scales with the
detail a picture holds. The generator mixes what photos have: smooth gradients
(sky, walls), shapes with hard edges, 1/f ("pink") noise built as a pyramid of
upsampled random fields, fine texture, and sensor grain; it encodes at quality
85-90 with 4:2:0 chroma, like a camera or phone: about 1.5-2.5 bits per pixel, as real
photos at that quality (every report prints the set's average). Every image is a pure
function of its seed, so the cache (``$BENCH_DATA``, default ``/tmp/dedupd-bench``) is
regenerated when missing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA = Path(os.environ.get("BENCH_DATA", "/tmp/dedupd-bench"))
PYTHON = sys.executable

# Megapixel bands the targets speak of: (width, height) pairs, 4:3 and 3:2, both ways.
SIZES_SMALL = [(1280, 960), (1440, 1080), (1600, 1200), (1200, 1600), (1728, 1152),
               (1152, 864), (1632, 1224)]                                  # 1.0-2.0 MP
SIZES_LARGE = [(4000, 3000), (3648, 2736), (4032, 3024), (3000, 4000), (4240, 2832),
               (3456, 2592)]                                               # 8.9-12.2 MP
SIZES_SCAN = [(800, 600), (960, 720), (1024, 683), (720, 960), (640, 480)]  # 0.3-0.7 MP


def pink_noise(rng: np.random.Generator, width: int, height: int, octaves: int = 7
               ) -> np.ndarray:
    """Roughly 1/f noise: octave k is a random field 2^k times coarser, weighted by scale."""
    out = np.zeros((height, width), np.float32)
    total = 0.0
    for k in range(octaves):
        step = 2 ** k
        h, w = max(2, height // step), max(2, width // step)
        field = rng.standard_normal((h, w), dtype=np.float32)
        out += cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC) * step
        total += step
    return out / total


def photo(seed: int, width: int, height: int) -> np.ndarray:
    """A photo-like BGR picture, deterministic by seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Two-colour gradient (sky to ground), at a random angle.
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # Shapes with hard, anti-aliased edges: objects, windows, horizons.
    scale = min(width, height)
    for _ in range(int(rng.integers(8, 16))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind = rng.integers(0, 3)
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(img, (cx, cy), int(rng.integers(scale // 20, scale // 4)), colour, -1,
                       cv2.LINE_AA)
        elif kind == 1:
            dx, dy = int(rng.integers(scale // 20, scale // 3)), int(rng.integers(scale // 20,
                                                                                   scale // 3))
            cv2.rectangle(img, (cx, cy), (cx + dx, cy + dy), colour, -1, cv2.LINE_AA)
        else:
            pts = rng.integers(0, [width, height], (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    # Soften edges slightly (lens), then add 1/f luminance structure, texture and grain.
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    img += (pink_noise(rng, width, height) * rng.uniform(10, 18))[..., None]
    # Fine texture (foliage, fabric, gravel) over part of the frame: most of the bits.
    # Its strength varies from picture to picture, as sky vs. forest shots do.
    fine = pink_noise(rng, width, height, 3) * rng.uniform(15, 70)
    period = rng.uniform(3, 9)
    fine += np.sin(xx / period + 2 * np.sin(yy / (period * 3))) * rng.uniform(4, 10)
    cover = pink_noise(rng, width, height, 8) > rng.uniform(-0.1, 0.3)
    mask = cv2.GaussianBlur(cover.astype(np.float32), (0, 0), 3)
    img += (fine * mask)[..., None]
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2.5, 4.5)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    return buf.tobytes()


def variant(img: np.ndarray, v: int, rng: np.random.Generator) -> np.ndarray:
    """Variant v of a picture: 0-7 are its flips and rotations (different pictures to a
    dHash, same decode cost); 8 and up are near-duplicates (a 3-10% downscale or a crop
    of up to 4% per side), as a re-encoded or re-saved copy of a photo would be."""
    if v < 8:
        if v & 4:
            img = img.transpose(1, 0, 2)
        if v & 2:
            img = img[::-1]
        if v & 1:
            img = img[:, ::-1]
        return np.ascontiguousarray(img)
    h, w = img.shape[:2]
    if rng.random() < 0.5:
        f = rng.uniform(0.90, 0.97)
        return cv2.resize(img, (int(w * f), int(h * f)), interpolation=cv2.INTER_AREA)
    dx, dy = int(w * rng.uniform(0, 0.04)), int(h * rng.uniform(0, 0.04))
    return img[dy:h - dy, dx:w - dx]


def photo_set(name: str, count: int, sizes: Sequence[tuple[int, int]], *, originals: int,
              seed: int = 0) -> list[Path]:
    """`count` JPEGs in BENCH_DATA/name, generated once and then reused.

    File i is variant i // originals (see `variant`) of picture i % originals: with
    count <= 8 * originals every file is a distinct picture; beyond, near-duplicates
    follow. Qualities vary from 85 to 90. A larger count extends a smaller set.
    """
    folder = BENCH_DATA / name
    paths = [folder / f"{i:05d}.jpg" for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if not missing:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"generating {len(missing)} images in {folder} ...", file=sys.stderr, flush=True)
    by_original: dict[int, list[int]] = {}
    for i in missing:
        by_original.setdefault(i % originals, []).append(i)
    for n, (base, indices) in enumerate(sorted(by_original.items())):
        w, h = sizes[(base + seed) % len(sizes)]
        img = photo(seed * 1_000_003 + base, w, h)
        for i in indices:
            rng = np.random.default_rng([seed, i])
            data = encode_jpeg(variant(img, i // originals, rng), int(rng.integers(85, 91)))
            tmp = paths[i].with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, paths[i])
        if (n + 1) % 50 == 0:
            print(f"  {n + 1}/{len(by_original)} pictures", file=sys.stderr, flush=True)
    print(f"  done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return paths


def reencoded(name: str, sources: Sequence[Path], quality: int) -> list[Path]:
    """The sources decoded and saved again at `quality` (4:2:0), in BENCH_DATA/name, as a
    web pipeline or an editor re-saves photos: same pictures, other bits per pixel."""
    folder = BENCH_DATA / name
    paths = [folder / p.name for p in sources]
    missing = [(s, p) for s, p in zip(sources, paths, strict=True) if not p.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"re-encoding {len(missing)} images at quality {quality} in {folder} ...",
              file=sys.stderr, flush=True)
        for source, path in missing:
            tmp = path.with_suffix(".part")
            tmp.write_bytes(encode_jpeg(cv2.imread(str(source)), quality))
            os.replace(tmp, path)
    return paths


def warm(paths: Sequence[Path]) -> None:
    """Read every file once so the timed run finds it in the page cache: the measures are
    of decoding, not of the disk. (This machine's kernel reclaims idle page cache within
    a minute or so, so a set read a while ago is cold again.)"""
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass


def describe(paths: Sequence[Path]) -> str:
    """'N files, a-b MP, avg X KB, Y bits/pixel' for the headers of a report."""
    mps, sizes = [], []
    for p in paths:
        with open(p, "rb") as fh:
            head = fh.read(65536)
        from dedupd.imagefile import image_size

        w, h = image_size(head, "jpeg") or (0, 0)
        mps.append(w * h / 1e6)
        sizes.append(p.stat().st_size)
    bpp = 8 * sum(sizes) / (sum(mps) * 1e6)
    return (f"{len(paths)} JPEGs, {min(mps):.1f}-{max(mps):.1f} MP, "
            f"avg {np.mean(sizes) / 1e3:.0f} KB, {bpp:.1f} bits/pixel")


def machine() -> str:
    """Cores, CPU model and load, printed at the top of every report."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (f"{os.cpu_count()} cores ({model}), load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}, Python {sys.version.split()[0]}, OpenCV {cv2.__version__}, "
            f"numpy {np.__version__}")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


# ---------------------------------------------------------------- the daemon as a subprocess

DECISIONS = frozenset({"image_accepted", "duplicate_quarantined", "duplicate_logged",
                       "duplicate_deleted", "image_rejected"})


def event_time(ts: str) -> float:
    """Epoch seconds of an event's `ts` (UTC, microseconds)."""
    from datetime import datetime

    return datetime.fromisoformat(ts).timestamp()  # C parser: the harness shares the cores


class DaemonUnderTest:
    """`dedupd run --log json` on a config of our own; decisions collected from stderr.

    `decided[path]` is the epoch time of the path's decision event (its `ts`)."""

    def __init__(self, workdir: Path, roots: Sequence[Path], **config: object) -> None:
        import json
        import threading

        import yaml

        self.workdir = workdir
        body = {"index": str(workdir / "state" / "index.sqlite"),
                "quarantine_dir": str(workdir / "state" / "quarantine"),
                "watches": [{"path": str(r)} for r in roots],
                "log": {"summary_interval": 3600}, **config}
        self.config_path = workdir / "dedupd.yaml"
        self.config_path.write_text(yaml.safe_dump(body))
        self.decided: dict[str, float] = {}
        self.order: list[str] = []  # decided paths, in arrival order
        self.kinds: dict[str, int] = {}
        self.started = threading.Event()
        self._cond = threading.Condition()
        self._json = json
        dedupd = Path(PYTHON).with_name("dedupd")
        cmd = [str(dedupd)] if dedupd.exists() else [PYTHON, "-m", "dedupd"]
        import subprocess

        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM")}
        self.proc = subprocess.Popen([*cmd, "--config", str(self.config_path), "--log", "json",
                                      "run"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.started.wait(60):
            raise SystemExit("the daemon did not start within 60 s")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                objs = [self._json.loads(raw)]
            except ValueError:
                objs = self._glued(raw.decode(errors="replace"))
            for obj in objs:
                self._note(obj)

    def _glued(self, text: str) -> list[dict]:
        """Events that threads wrote onto one line (issue #12 item 18), or noise to show."""
        decoder, objs, at = self._json.JSONDecoder(), [], 0
        try:
            while at < len(text.rstrip()):
                obj, at = decoder.raw_decode(text, at)
                objs.append(obj)
        except ValueError:
            print(f"daemon: {text.rstrip()}", file=sys.stderr)
        return objs

    def _note(self, obj: dict) -> None:
        event = obj.get("event")
        if event == "started":
            self.started.set()
        elif event in DECISIONS:
            with self._cond:
                self.decided[obj["path"]] = event_time(obj["ts"])
                self.order.append(obj["path"])
                self.kinds[event] = self.kinds.get(event, 0) + 1
                self._cond.notify_all()
        elif obj.get("priority", 6) <= 4:
            print(f"daemon: {obj.get('message')}", file=sys.stderr)

    def wait_decided(self, paths: Sequence[str], timeout: float) -> bool:
        """Wait for every path's decision. Each wake-up looks only at the decisions that
        arrived since the last one: the harness shares the daemon's cores, so its own
        bookkeeping must stay small (rechecking every path per decision is quadratic)."""
        deadline = time.monotonic() + timeout
        pending, seen = set(paths), 0
        with self._cond:
            while True:
                pending.difference_update(self.order[seen:])
                seen = len(self.order)
                if not pending:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(5)
        return code
