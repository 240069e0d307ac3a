"""The CLI as a user runs it: real processes, exit codes, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2


def dedupd(*args: str, check: int | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "dedupd", *args], capture_output=True,
                          text=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_hash_prints_hex_and_path(make_photo) -> None:
    p = make_photo("a.jpg", seed=3)
    out = dedupd("hash", str(p), check=0).stdout.split()
    assert len(out[0]) == 16 and out[1] == str(p)
    js = json.loads(dedupd("hash", "--json", "--size", "16", str(p), check=0).stdout)
    assert len(js[0]["hash"]) == 64 and len(js[0]["digest"]) == 64


def test_hash_bad_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    proc = dedupd("hash", str(bad), check=2)
    assert "empty" in proc.stderr


def test_scan_then_check(make_photo, tmp_path: Path, config_file) -> None:
    data = tmp_path / "data"
    for s in range(6):
        make_photo(f"img{s}.jpg", seed=s, root=data)
    original = data / "img0.jpg"
    img = cv2.imread(str(original))
    cv2.imwrite(str(data / "zz_copy.png"), cv2.resize(img, (320, 240)))
    cfg = str(config_file())
    proc = dedupd("--config", cfg, "scan", "--json", str(data), check=1)
    summary = json.loads(proc.stdout)
    assert summary["duplicates"] == 1 and summary["indexed"] == 6
    assert summary["groups"][0]["original"] == str(original)
    probe = tmp_path / "probe.jpg"
    cv2.imwrite(str(probe), img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    js = json.loads(dedupd("--config", cfg, "check", "--json", str(probe), check=1).stdout)
    assert js["duplicate"] and js["matches"][0]["path"] == str(original)
    fresh = make_photo("fresh.jpg", seed=99)
    dedupd("--config", cfg, "check", str(fresh), check=0)
    stats = json.loads(dedupd("--config", cfg, "stats", "--json", check=0).stdout)
    assert stats["images"] == 6


def test_bad_config_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policies:\n  default:\n    max_distance: lots\n")
    proc = dedupd("--config", str(cfg), "validate", check=2)
    assert proc.stderr.strip().count("\n") == 0
    assert "policies.default.max_distance" in proc.stderr and str(cfg) in proc.stderr
