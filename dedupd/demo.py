"""The demo: the daemon on a throwaway folder, fed with generated photos (and the photo
generator the tests use too).

Shows the whole path a user cares about — files landing, near-duplicates caught and
quarantined, a corrupt file rejected — with the embedded SQLite store, in seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dedupd.config import parse_config
from dedupd.daemon import Daemon
from dedupd.events import setup_logging
from dedupd.store import QuarantineEntry


def synthetic_photo(seed: int, width: int = 800, height: int = 600) -> np.ndarray:
    """A photo-like BGR picture: smooth colour fields, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    for _ in range(6):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(min(width, height) // 12, min(width, height) // 3))
        cv2.circle(img, centre, radius, tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    img += rng.normal(0, 6, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _drop(path: Path, data: bytes, *, via_tmp: bool = False) -> None:
    """Write like a well-behaved producer: directly, or to a temp name then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".tmp") if via_tmp else path
    target.write_bytes(data)
    if via_tmp:
        os.rename(target, path)


def _wait_decided(daemon: Daemon, paths: list[Path], timeout: float = 30.0) -> None:
    """Until every dropped file is decided (indexed where it lies, rejected, or its
    quarantine done) and the daemon is idle. Idle alone is not enough: right after a
    drop the watcher may not have read the file's event yet, and the queue looks empty."""
    store = daemon.store
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {e.original_path for e in store.list_quarantine(("done",))}
        if daemon.idle() and all(
                str(p) in done or store.get_by_path(str(p)) is not None
                or store.get_rejection(str(p)) is not None for p in paths):
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class DemoResult:
    kept: int  # images kept in the dataset
    quarantined: list[QuarantineEntry]  # the duplicates caught


def run_demo(base: Path, log_mode: str = "stderr") -> DemoResult:
    """Run the daemon on a dataset under base (an empty folder) while files land in it."""
    train, test = base / "dataset" / "train", base / "dataset" / "test"
    train.mkdir(parents=True)
    test.mkdir(parents=True)
    config = parse_config({
        "index": str(base / "state" / "index.sqlite"),
        "quarantine_dir": str(base / "quarantine"),
        "settle_seconds": 0.5,
        "watches": [{"path": str(train), "group": "demo"},
                    {"path": str(test), "group": "demo"}],
    }, "<demo>")
    setup_logging(log_mode, "info")
    daemon = Daemon(config)
    daemon.start()
    try:
        originals = [synthetic_photo(seed) for seed in range(12)]
        first = [train / f"photo_{i:02d}.jpg" for i in range(len(originals))]
        for path, img in zip(first, originals, strict=True):
            _drop(path, _jpeg(img))
        _wait_decided(daemon, first)
        # Near-duplicates: re-encoded, resized, a byte copy, and a train/test leak.
        later = [train / "incoming" / "photo_03_small.jpg", train / "photo_05_copy.jpg",
                 test / "photo_07_q50.jpg", test / "new_scene.jpg", train / "broken.jpg"]
        _drop(later[0],
              _jpeg(cv2.resize(originals[3], (400, 300), interpolation=cv2.INTER_AREA), 60),
              via_tmp=True)
        _drop(later[1], (train / "photo_05.jpg").read_bytes(), via_tmp=True)
        _drop(later[2], _jpeg(originals[7], 50))
        _drop(later[3], _jpeg(synthetic_photo(100)))
        _drop(later[4], _jpeg(synthetic_photo(200))[:5000])
        _wait_decided(daemon, later)
        entries = daemon.store.list_quarantine(("done",))
        stats = daemon.store.stats()
    finally:
        daemon.stop()
    return DemoResult(kept=stats.by_status.get("kept", 0), quarantined=entries)
