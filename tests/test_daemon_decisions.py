"""Decisions that used to go wrong and stay wrong (issue #12, items 7-10, 13, 19), on a
real daemon subprocess: real inotify, real files, real SQLite, real mounts where a fault
is needed (a full tmpfs as the quarantine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, records, wait_for

from dedupd.hashing import Recipe, hamming, hash_file


def cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg), *args],
                          capture_output=True, text=True, timeout=120)


def encode(img, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a quarantine file system that fills)")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def test_a_duplicate_that_cannot_be_removed_stays_pending_and_is_retried(setup,
                                                                         tmp_path: Path
                                                                         ) -> None:
    """#12-7 and #11-4: the quarantine file system is full. The duplicate stays in place
    recorded as unresolved (not kept), `quarantine list --pending`, `check` and `scan`
    all call it a duplicate, no orphan copy is left, and once there is room a reload
    retries it."""
    qfs = tmp_path / "qfs"
    mount_tmpfs(qfs, "512k")
    try:
        cfg, root, db, _ = setup(quarantine_dir=str(qfs / "q"))
        filler = qfs / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
        try:
            data = encode(photo(3, 640, 480))
            (root / "a.jpg").write_bytes(data)
            wait_for(lambda: records(db).get(str(root / "a.jpg")) == "kept", 30, "a kept")
            (root / "b.jpg").write_bytes(data)  # a byte-identical copy
            wait_for(lambda: records(db).get(str(root / "b.jpg")) == "unresolved", 30,
                     "b recorded as unresolved")
            assert (root / "b.jpg").read_bytes() == data
            orphans = [p for p in qfs.rglob("*") if p.is_file() and p != filler]
            assert orphans == []
            pending = cli(cfg, "quarantine", "list", "--pending", "--json")
            assert pending.returncode == 0, pending.stderr
            rows = json.loads(pending.stdout)
            assert [(r["path"], r["matched_path"]) for r in rows] == [
                (str(root / "b.jpg"), str(root / "a.jpg"))]
            assert cli(cfg, "check", str(root / "b.jpg")).returncode == 1
            scan = cli(cfg, "scan", "--dry-run", "--json", str(root))
            assert scan.returncode == 1, scan.stdout + scan.stderr
            assert str(root / "b.jpg") in scan.stdout
            filler.unlink()
            daemon.signal(signal.SIGHUP)  # the cause may be gone: a reload retries
            wait_for(lambda: not (root / "b.jpg").exists(), 30, "b quarantined on retry")
            # The record follows the move (Quarantine.move_in: link, unlink, then the
            # record): polled, not read once the file is gone.
            wait_for(lambda: "unresolved" not in records(db).values(), 30,
                     "b's record no longer unresolved")
            assert (root / "a.jpg").exists()
        finally:
            assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(qfs)], check=False)


def test_circuit_breaker_holds_duplicates_as_pending_until_reload(setup,
                                                                  tmp_path: Path) -> None:
    """#12-7: duplicates left in place by an open circuit breaker are unresolved, and
    quarantined once a reload re-arms it."""
    cfg, root, db, quarantine = setup(
        circuit_breaker={"window": 2, "min_decisions": 2, "threshold": 0.5})
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        data = encode(photo(4, 320, 240))
        (root / "a.jpg").write_bytes(data)
        wait_for(lambda: records(db).get(str(root / "a.jpg")) == "kept", 30, "a kept")
        (root / "b.jpg").write_bytes(data)
        wait_for(lambda: not (root / "b.jpg").exists(), 30, "b quarantined")
        (root / "c.jpg").write_bytes(data)  # 2 of the last 2 would remove: trips
        wait_for(lambda: records(db).get(str(root / "c.jpg")) == "unresolved", 30,
                 "c left in place as unresolved")
        assert "circuit_open" in daemon.log()
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: not (root / "c.jpg").exists(), 30, "c quarantined after reload")
        wait_for(lambda: "unresolved" not in records(db).values(), 30,
                 "c's record no longer unresolved")  # it follows the move
    finally:
        assert daemon.stop() == 0


def test_keep_first_means_arrival_order(setup, tmp_path: Path) -> None:
    """#12-8: an original that takes long to hash (a large PNG) arrives first, then a
    small, quickly hashed copy. The copy used to win because it finished hashing first;
    the original must be kept, for files written while running and for files found by
    the start-up scan (by mtime)."""
    cfg, root, db, quarantine = setup()
    recipe = Recipe()
    pairs = []
    for i, seed in enumerate((21, 22, 23)):
        big = photo(seed, 3000, 2250)
        small = cv2.resize(big, (300, 225), interpolation=cv2.INTER_AREA)
        pairs.append((f"orig{i}.png", cv2.imencode(".png", big)[1].tobytes(),
                      f"orig{i}_small.jpg", encode(small, 60)))
    staged = tmp_path / "staged"
    staged.mkdir()
    for a, da, b, db_ in pairs:
        (staged / a).write_bytes(da)
        (staged / b).write_bytes(db_)
        assert hamming(hash_file(staged / a, recipe).hash, hash_file(staged / b, recipe).hash) \
            <= 6
    # Found by the start-up scan: originals are older (mtime) than their copies.
    for n, (a, _, b, _) in enumerate(pairs[:2]):
        shutil.copy(staged / a, root / a)
        shutil.copy(staged / b, root / b)
        os.utime(root / a, (1_600_000_000 + n, 1_600_000_000 + n))
        os.utime(root / b, (1_700_000_000 + n, 1_700_000_000 + n))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        a, da, b, db_ = pairs[2]  # while running: `cp a; cp b`
        (root / a).write_bytes(da)
        (root / b).write_bytes(db_)
        wait_for(lambda: sorted(records(db).values()) == ["kept"] * 3 + ["quarantined"] * 3,
                 120, "every file decided")
        recs = records(db)
        for a, _, b, _ in pairs:
            assert recs.get(str(root / a)) == "kept", (a, recs)
            assert (root / a).exists() and not (root / b).exists()
    finally:
        assert daemon.stop() == 0


def test_keep_first_for_a_directory_moved_in_whole(setup, tmp_path: Path) -> None:
    """A directory moved into a root brings its files with synthetic creation events in
    listing order; keep: first must still go by when each was written (its mtime):
    the original stays, each later copy is quarantined, whatever the listing order."""
    cfg, root, db, _ = setup()
    staged = tmp_path / "incoming"
    staged.mkdir()
    names = []
    for i, seed in enumerate(range(31, 41)):
        img = photo(seed, 320, 240)
        original, copy = staged / f"z{i}_original.jpg", staged / f"a{i}_copy.jpg"
        original.write_bytes(encode(img, 92))
        copy.write_bytes(encode(img, 60))
        os.utime(original, (1_600_000_000 + i, 1_600_000_000 + i))
        os.utime(copy, (1_700_000_000 + i, 1_700_000_000 + i))
        names.append((original.name, copy.name))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        staged.rename(root / "batch")
        wait_for(lambda: sorted(records(db).values()) == ["kept"] * 10 + ["quarantined"] * 10,
                 60, "every file decided")
        for original, copy in names:
            assert (root / "batch" / original).exists(), original
            assert not (root / "batch" / copy).exists(), copy
            # Decided once: never accepted first and then replaced by its original.
            assert f"{copy}: accepted" not in daemon.log(), copy
    finally:
        assert daemon.stop() == 0


def test_keep_first_across_directories_found_by_the_start_up_scan(setup,
                                                                    tmp_path: Path) -> None:
    """Copies written while the daemon was down in the root, their originals (older) in
    subdirectories: the start-up scan walks directory by directory, and a later copy in a
    directory walked first was accepted, then replaced by its original found later (two
    decisions; 3 of 3 runs before). A run's files are queued oldest first across its
    directories."""
    cfg, root, db, _ = setup()
    names = []
    when = 1_600_000_000
    for i, seed in enumerate(range(41, 49)):
        img = photo(seed, 320, 240)
        # The root is listed before its subdirectories: each copy is found first.
        original = root / f"d{i}" / "original.jpg"
        copy = root / f"copy_of_{i}.jpg"
        for path, quality, at in ((original, 92, when), (copy, 60, when + 10_000)):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(encode(img, quality))  # (before the daemon starts)
            os.utime(path, (at, at))
        when += 1
        names.append((original, copy))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: sorted(records(db).values()) == ["kept"] * 8 + ["quarantined"] * 8,
                 60, "every file decided")
        for original, copy in names:
            assert original.exists() and not copy.exists(), copy
            assert f"{copy}: accepted" not in daemon.log(), copy
    finally:
        assert daemon.stop() == 0


def test_a_directory_moved_out_and_back_keeps_its_records(setup, tmp_path: Path) -> None:
    """The newcomer trial: `mv root/n /tmp/n; mv /tmp/n root/n` within a second decided
    every file again (a second "accepted", a new id) and quarantined a restored file
    anew, undoing the operator's restore. Its records now get a moved-away file's grace."""
    cfg, root, db, _ = setup()
    sub, outside = root / "n", tmp_path / "parked"
    original = write_image(root / "original.jpg", photo(51, 320, 240))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: records(db).get(str(original)) == "kept", 20, "original kept")
        sub.mkdir()
        write_image(sub / "other.jpg", photo(52, 320, 240))
        (sub / "dup.jpg").write_bytes(encode(photo(51, 320, 240), 60))
        wait_for(lambda: records(db).get(str(sub / "other.jpg")) == "kept"
                 and not (sub / "dup.jpg").exists(), 20, "other kept, dup quarantined")
        assert cli(cfg, "restore", str(sub / "dup.jpg")).returncode == 0
        wait_for(lambda: records(db).get(str(sub / "dup.jpg")) == "allowed", 20, "allowed")
        said = daemon.log().count(": accepted")
        ids = dict(sqlite3.connect(db).execute("SELECT path, id FROM images"))
        sub.rename(outside)
        time.sleep(0.8)  # parked elsewhere for a moment (the fault, not a sync point)
        outside.rename(sub)
        time.sleep(4.0)  # past the grace: a forget or a new decision would have come
        wait_for(lambda: records(db).get(str(sub / "dup.jpg")) == "allowed", 20,
                 "the restore kept")
        assert (sub / "dup.jpg").exists() and daemon.log().count(": accepted") == said
        assert dict(sqlite3.connect(db).execute("SELECT path, id FROM images")) == ids
    finally:
        assert daemon.stop() == 0


def test_a_slow_writer_is_not_judged_before_it_finishes(setup, tmp_path: Path) -> None:
    """#12-9: a writer pausing far longer than settle_seconds after a few bytes used to
    have its file called corrupt/unsupported and moved to rejected_dir mid-write. Only a
    provably finished file is rejected: a broken file closed by its writer still is."""
    cfg, root, db, _ = setup(rejected_dir=str(tmp_path / "rejected"))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        data = encode(photo(7, 640, 480))
        path = root / "slow.jpg"
        with open(path, "wb") as fh:
            fh.write(data[:100])
            fh.flush()
            time.sleep(3.0)  # the writer's pause (6x settle_seconds); not a sync point
            fh.write(data[100:])
        wait_for(lambda: records(db).get(str(path)) == "kept", 30, "slow.jpg accepted")
        assert path.read_bytes() == data
        assert "slow.jpg: " not in daemon.log().replace("slow.jpg: accepted", "")
        assert not list((tmp_path / "rejected").rglob("slow.jpg"))
        # A broken file that its writer closed is still rejected (after settling).
        (root / "junk.jpg").write_bytes(b"not an image at all\n" * 3)
        wait_for(lambda: list((tmp_path / "rejected").rglob("junk.jpg")), 30, "junk moved")
    finally:
        assert daemon.stop() == 0


def test_rejections_are_logged_once_across_restarts(setup, tmp_path: Path) -> None:
    """#12-19: a file left in place as rejected is logged once, not again at every start
    or rescan, until it changes."""
    cfg, root, db, _ = setup(reconcile_interval=1)
    bad = root / "bad.jpg"
    log = tmp_path / "daemon.log"

    def said() -> int:
        return log.read_text(errors="replace").count("bad.jpg: ")

    daemon = DaemonProcess(cfg, log).start()
    try:
        bad.write_bytes(b"\xff\xd8\xff" + b"junk" * 10)  # a broken JPEG, left in place
        wait_for(lambda: said() == 1, 30, "bad.jpg rejected")
        started = time.monotonic()
        # Several periodic rescans (every second) later, still said once.
        wait_for(lambda: time.monotonic() - started > 3 and daemon.log().count(
            "dedupd: started:") == 1, 30, "a few rescans")
    finally:
        assert daemon.stop() == 0
    daemon = DaemonProcess(cfg, log).start()
    try:
        wait_for(lambda: log.read_text().count("dedupd: started:") == 2, 30, "second start")
        (root / "marker.jpg").write_bytes(encode(photo(8, 64, 48)))
        wait_for(lambda: records(db).get(str(root / "marker.jpg")) == "kept", 30, "marker")
        assert said() == 1
        with open(bad, "ab") as fh:  # changed: judged (and said) again
            fh.write(b"more")
        wait_for(lambda: said() == 2, 30, "changed bad.jpg rejected again")
    finally:
        assert daemon.stop() == 0


def test_a_watched_root_deleted_or_replaced_is_watched_again(setup, tmp_path: Path) -> None:
    """#12-10: `rm -rf root; mkdir root` and `mv root old; mkdir root` are noticed and
    logged once, and files landing in the new directory are processed at once."""
    cfg, root, db, _ = setup(reconcile_interval=3600)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        shutil.rmtree(root)
        wait_for(lambda: "watched root is gone" in daemon.log(), 30, "the loss logged")
        root.mkdir()
        wait_for(lambda: "watching it again" in daemon.log(), 30, "re-armed")
        write_image(root / "one.jpg", photo(31, 320, 240))
        wait_for(lambda: records(db).get(str(root / "one.jpg")) == "kept", 30,
                 "a file in the re-created root")
        os.rename(root, tmp_path / "old")
        root.mkdir()
        wait_for(lambda: daemon.log().count("watching it again") == 2, 30, "replaced root")
        write_image(root / "two.jpg", photo(32, 320, 240))
        wait_for(lambda: records(db).get(str(root / "two.jpg")) == "kept", 30,
                 "a file in the replacing root")
        assert daemon.log().count("watched root is gone") == 1
        wait_for(lambda: str(root / "one.jpg") not in records(db), 30,
                 "the record of a file moved away with the old root forgotten")
    finally:
        assert daemon.stop() == 0


def test_unreadable_directories_are_reported_once_and_skipped(setup, tmp_path: Path) -> None:
    """#12-13: as an unprivileged service sees it (no DAC override), an unreadable
    subdirectory is one line, once, and the rest of the root is processed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_DAC_OVERRIDE with setpriv")
    cfg, root, db, _ = setup(reconcile_interval=1)
    locked = root / "locked"
    write_image(locked / "inside.jpg", photo(41, 64, 48))
    write_image(root / "open" / "fine.jpg", photo(42, 320, 240))
    locked.chmod(0)
    no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log", prefix=no_dac).start()
    try:
        wait_for(lambda: records(db).get(str(root / "open" / "fine.jpg")) == "kept", 30,
                 "the readable part processed")
        wait_for(lambda: "cannot read this directory" in daemon.log(), 30, "reported")
        # A directory readable but not searchable: its files cannot even be stat'ed.
        half = root / "half"
        write_image(half / "x.jpg", photo(43, 64, 48))
        half.chmod(0o644)
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 3, 10, "a few periodic rescans")
        log = daemon.log()
        assert log.count(f"{locked}: cannot read this directory") == 1, log
        assert log.count(f"{half}: cannot read this directory") == 1, log
        assert "Traceback" not in log and daemon.proc.poll() is None
    finally:
        locked.chmod(0o755)
        if (root / "half").exists():
            (root / "half").chmod(0o755)
        assert daemon.stop() == 0


def test_scan_keeps_the_older_file_whichever_hashes_first(setup, tmp_path: Path) -> None:
    """#12-8 for `dedupd scan`: files a scan finds arrive in mtime order; a small copy
    (newer mtime) that hashes long before its large original must not win."""
    cfg, root, db, quarantine = setup()
    big = photo(61, 3000, 2250)
    (root / "orig.png").write_bytes(cv2.imencode(".png", big)[1].tobytes())
    (root / "copy.jpg").write_bytes(
        encode(cv2.resize(big, (300, 225), interpolation=cv2.INTER_AREA), 60))
    os.utime(root / "orig.png", (1_600_000_000, 1_600_000_000))
    os.utime(root / "copy.jpg", (1_700_000_000, 1_700_000_000))
    done = cli(cfg, "scan", "--json", "-j", "2", str(root))
    assert done.returncode == 1, done.stdout + done.stderr
    assert (root / "orig.png").exists() and not (root / "copy.jpg").exists()
    assert records(db).get(str(root / "orig.png")) == "kept"


def test_what_the_daemon_remembers_per_file_is_dropped_once_decided(setup) -> None:
    """#12-19's 'no unbounded in-memory set': after files (images, files of other
    types, a broken one) are decided, nothing is kept per path in memory."""
    from dedupd.config import load_config
    from dedupd.daemon import Daemon

    cfg, root, db, _ = setup()
    daemon = Daemon(load_config(str(cfg)), config_path=str(cfg))
    daemon.start()
    try:
        write_image(root / "a.jpg", photo(71, 64, 48))
        (root / "notes.txt").write_text("not an image type the policy wants")
        (root / "junk.jpg").write_bytes(b"junk")
        wait_for(lambda: "a.jpg" in str(records(db)) and daemon.store.get_rejection(
            str(root / "junk.jpg")) is not None and daemon.idle(), 30, "all decided")
        assert daemon.intake.closed == {} and len(daemon.queue) == 0
    finally:
        daemon.stop()
