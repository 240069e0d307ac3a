"""Policy rules: pure decisions, and the daemon applying keep=largest, groups, breaker."""

from __future__ import annotations

from pathlib import Path

import cv2
from conftest import photo, write_image
from daemonproc import DaemonProcess, files_under, records, wait_for, write_config

from dedupd.config import CircuitBreaker, Policy
from dedupd.policy import ACCEPT, DUPLICATE, REPLACE, Breaker, decide
from dedupd.store import ImageRecord, Match


def rec(w: int, h: int, path: str = "/x.jpg") -> ImageRecord:
    return ImageRecord("s", path, "dhash:8:fast:area:v1", 1, "d", 1, 1, w, h)


def test_decide_keep_first_and_largest() -> None:
    small, big = rec(100, 100, "/small.jpg"), rec(1000, 1000, "/big.jpg")
    assert decide(Policy("p"), big, []).verdict == ACCEPT
    first = decide(Policy("p"), big, [Match(small, 2, False)])
    assert (first.verdict, first.match.record.path) == (DUPLICATE, "/small.jpg")
    largest = decide(Policy("p", keep="largest"), big, [Match(small, 2, False)])
    assert largest.verdict == REPLACE
    assert decide(Policy("p", keep="largest"), small, [Match(big, 2, False)]).verdict == DUPLICATE
    assert decide(Policy("p"), big, [Match(small, 0, True)], breaker_open=True).action == "log"


def test_breaker_trips_on_a_burst_of_removals() -> None:
    b = Breaker(CircuitBreaker(window=10, threshold=0.5, min_decisions=4))
    assert [b.record(x) for x in (True, True, False)] == [False, False, False]
    assert b.record(True) is True and b.open
    assert b.record(True) is False  # reported once


def encode(img, quality: int = 90, scale: float = 1.0) -> bytes:
    if scale != 1.0:
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def test_daemon_keep_largest_groups_and_circuit_breaker(tmp_path: Path) -> None:
    roots = {n: tmp_path / n for n in ("big", "train", "test", "other", "burst")}
    for r in roots.values():
        r.mkdir()
    cfg = write_config(tmp_path / "c.yaml", {
        "index": str(tmp_path / "i.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "policies": {"largest": {"keep": "largest", "max_distance": 6},
                     "default": {"max_distance": 6}},
        "circuit_breaker": {"window": 10, "threshold": 0.5, "min_decisions": 6},
        "watches": [{"path": str(roots["big"]), "policy": "largest"},
                    {"path": str(roots["train"]), "group": "ds"},
                    {"path": str(roots["test"]), "group": "ds"},
                    {"path": str(roots["other"])},
                    {"path": str(roots["burst"])}]})
    daemon = DaemonProcess(cfg, tmp_path / "log").start()
    db = tmp_path / "i.sqlite"
    try:
        img = photo(1, 640, 480)
        (roots["big"] / "small.jpg").write_bytes(encode(img, scale=0.5))
        wait_for(lambda: str(roots["big"] / "small.jpg") in records(db), 30, "small indexed")
        (roots["big"] / "large.jpg").write_bytes(encode(img))
        wait_for(lambda: [p.name for p in files_under(tmp_path / "q")] == ["small.jpg"], 30,
                 "the smaller copy quarantined")
        assert (roots["big"] / "large.jpg").exists()
        # Train/test in one group leak into each other; another group never matches.
        leak = photo(2, 640, 480)
        (roots["train"] / "t.jpg").write_bytes(encode(leak))
        wait_for(lambda: str(roots["train"] / "t.jpg") in records(db), 30, "train image")
        (roots["other"] / "t.jpg").write_bytes(encode(leak, 70))
        (roots["test"] / "t.jpg").write_bytes(encode(leak, 70))
        wait_for(lambda: len(files_under(tmp_path / "q")) == 2, 30, "test leak quarantined")
        wait_for(lambda: records(db).get(str(roots["other"] / "t.jpg")) == "kept", 30,
                 "other group keeps its copy")
        # A burst of copies of one picture: after the breaker opens, files stay put.
        base = photo(3, 320, 240)
        (roots["burst"] / "base.jpg").write_bytes(encode(base))
        wait_for(lambda: str(roots["burst"] / "base.jpg") in records(db), 30, "burst base")
        for i in range(12):
            write_image(roots["burst"] / f"copy{i}.jpg", base, quality=60 + i)
        wait_for(lambda: "circuit_open" in daemon.log(), 30, "circuit breaker")
        wait_for(lambda: daemon.log().count("duplicate_logged") >= 1, 30, "log-only afterwards")
        in_q = [p for p in files_under(tmp_path / "q") if p.name.startswith("copy")]
        assert 0 < len(in_q) < 12
        assert len(list(roots["burst"].glob("copy*.jpg"))) + len(in_q) == 12
    finally:
        assert daemon.stop() == 0
