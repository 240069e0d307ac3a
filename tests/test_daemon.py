"""The daemon end to end: a real subprocess, real inotify, real files, real SQLite."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, files_under, records, sha, wait_for, write_config

from dedupd.hashing import Recipe, hamming, hash_file


def encode(img, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def near_copy(img, kind: int) -> bytes:
    """A near-duplicate: re-encoded at low quality, or resized, or both."""
    h, w = img.shape[:2]
    if kind == 0:
        return encode(img, 55)
    if kind == 1:
        return encode(cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA), 85)
    return encode(cv2.resize(img, (w * 3 // 4, h * 3 // 4), interpolation=cv2.INTER_AREA), 70)


def drop_slowly(path: Path, data: bytes, chunks: int = 4, pause: float = 0.05) -> None:
    """A slow producer: the file grows in chunks, closed only at the end."""
    with open(path, "wb") as fh:
        step = len(data) // chunks + 1
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)  # simulates a slow writer; not used to synchronise


def drop_via_tmp(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def distinct_seeds(n: int, size: tuple[int, int], min_distance: int = 12) -> list[int]:
    """Seeds whose photos' hashes are far apart, so 'duplicate' is unambiguous."""
    chosen: list[tuple[int, int]] = []
    seed = 1000
    recipe = Recipe()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        while len(chosen) < n:
            p = write_image(Path(d) / "x.jpg", photo(seed, *size))
            h = hash_file(p, recipe).hash
            if all(hamming(h, other) >= min_distance for _, other in chosen):
                chosen.append((seed, h))
            seed += 1
    return [s for s, _ in chosen]


def test_500_images_with_20_percent_near_duplicates(setup) -> None:
    cfg, root, db, quarantine = setup()
    seeds = distinct_seeds(400, (320, 240))
    originals = {s: photo(s, 320, 240) for s in seeds}
    first, second = seeds[:250], seeds[250:]
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        # Phase 1: 250 originals, half written directly, some slowly, some via tmp+rename.
        for i, s in enumerate(first):
            data, path = encode(originals[s]), root / f"orig_{s}.jpg"
            if i % 10 == 0:
                drop_slowly(path, data)
            elif i % 3 == 0:
                drop_via_tmp(path, data)
            else:
                path.write_bytes(data)
        wait_for(lambda: len(records(db)) >= 250, 120, "250 originals indexed")
        # Phase 2, concurrently: 150 new originals and 100 near-duplicates of phase 1.
        dup_of = {f"dup_{i}_{s}.jpg": s for i, s in enumerate(random.Random(1).sample(first, 100))}

        def writer(items: list[tuple[Path, bytes]], slow: bool) -> None:
            for n, (path, data) in enumerate(items):
                if slow and n % 5 == 0:
                    drop_slowly(path, data)
                elif n % 2:
                    drop_via_tmp(path, data)
                else:
                    path.write_bytes(data)

        batch_a = [(root / f"orig_{s}.jpg", encode(originals[s])) for s in second]
        batch_b = [(root / "incoming" / name, near_copy(originals[s], i % 3))
                   for i, (name, s) in enumerate(dup_of.items())]
        (root / "incoming").mkdir()
        threads = [threading.Thread(target=writer, args=(batch_a, False)),
                   threading.Thread(target=writer, args=(batch_b, True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: len(records(db)) >= 500, 180, "all 500 files decided")
        recs = records(db)
        kept = {Path(p).name for p, st in recs.items() if st == "kept"}
        quarantined = {p.name for p in files_under(quarantine)}
        assert kept == {f"orig_{s}.jpg" for s in seeds}
        assert quarantined == set(dup_of)
        assert {p.name for p in files_under(root)} == kept
        for name in dup_of:  # each has a JSON sidecar naming the original
            sidecar = next(quarantine.rglob(name + ".json"))
            assert f"orig_{dup_of[name]}.jpg" in sidecar.read_text()
        assert "duplicate_quarantined" in daemon.log()
    finally:
        assert daemon.stop() == 0


def no_loss(dropped: dict[str, str], root: Path, quarantine: Path, db: Path) -> str | None:
    """None if every dropped file is in exactly one place and the index agrees; else why."""
    try:
        in_root = {sha(p): p for p in files_under(root)}
        in_q = {sha(p): p for p in files_under(quarantine)}
    except FileNotFoundError as exc:  # listed, then moved by the daemon before it was read
        return f"in flux: {exc.filename}"
    for name, digest in dropped.items():
        if (digest in in_root) == (digest in in_q):
            return f"{name}: in root {digest in in_root}, in quarantine {digest in in_q}"
    recs = records(db)
    for p in in_root.values():
        if recs.get(str(p)) not in ("kept", "allowed"):
            return f"{p}: on disk in the root but index says {recs.get(str(p))}"
    for p in in_q.values():
        if recs.get(str(p)) != "quarantined":
            return f"{p}: in quarantine but index says {recs.get(str(p))}"
    for p in recs:
        if not Path(p).exists():
            return f"{p}: indexed but not on disk"
    return None


def test_sigkill_at_random_instants_loses_nothing(setup) -> None:
    cfg, root, db, quarantine = setup()
    rng = random.Random(7)
    seeds = distinct_seeds(40, (320, 240))
    dropped: dict[str, str] = {}
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log")
    for round_no in range(4):
        daemon.start()
        batch = seeds[round_no * 10:(round_no + 1) * 10]
        for s in batch:
            img = photo(s, 320, 240)
            for name, data in ((f"r{round_no}_{s}.jpg", encode(img)),
                               (f"r{round_no}_{s}_dup.jpg", near_copy(img, s % 3))):
                (root / name).write_bytes(data)
                dropped[name] = hashlib.sha256(data).hexdigest()
        time.sleep(rng.uniform(0.0, 0.6))  # a random instant to kill at, not a sync point
        daemon.kill()
    daemon.start()
    try:
        wait_for(lambda: no_loss(dropped, root, quarantine, db) is None, 60,
                 "the no-loss invariant")
        # Every original stays; each of its near-copies is either kept or quarantined,
        # but an original and its copy are never both gone.
        assert len(files_under(root)) + len(files_under(quarantine)) == len(dropped)
        assert len(files_under(quarantine)) > 0
    finally:
        problem = no_loss(dropped, root, quarantine, db)
        assert daemon.stop() == 0
    assert problem is None, problem


def test_startup_reconciliation(setup) -> None:
    cfg, root, db, quarantine = setup()
    seeds = distinct_seeds(3, (320, 240))
    write_image(root / "a.jpg", photo(seeds[0], 320, 240))
    write_image(root / "sub" / "b.jpg", photo(seeds[1], 320, 240))
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    wait_for(lambda: len(records(db)) == 2, 30, "existing files indexed")
    assert daemon.stop() == 0
    # While it is down: one file vanishes, one moves, one arrives, one duplicate arrives.
    (root / "a.jpg").unlink()
    (root / "moved").mkdir()
    os.rename(root / "sub" / "b.jpg", root / "moved" / "b.jpg")
    write_image(root / "c.jpg", photo(seeds[2], 320, 240))
    (root / "c_copy.jpg").write_bytes((root / "c.jpg").read_bytes())
    os.utime(root / "c_copy.jpg", ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    b_id = sqlite3.connect(db).execute("SELECT id FROM images WHERE path LIKE '%b.jpg'").fetchone()
    daemon.start()
    try:
        # c.jpg and its copy arrive together: two workers race, and either may be kept.
        wait_for(lambda: len(files_under(quarantine)) == 1 and set(records(db)) == {
            str(root / "moved" / "b.jpg"), *map(str, files_under(root)),
            *map(str, files_under(quarantine))}, 30, "reconciliation")
        kept = {p.name for p in files_under(root)}
        quarantined = {p.name for p in files_under(quarantine)}
        assert kept | quarantined == {"b.jpg", "c.jpg", "c_copy.jpg"}
        assert quarantined in ({"c.jpg"}, {"c_copy.jpg"})
        conn = sqlite3.connect(db)
        moved_id = conn.execute("SELECT id FROM images WHERE path = ?",
                                (str(root / "moved" / "b.jpg"),)).fetchone()
        assert moved_id == b_id  # the move updated the record, no new entry
    finally:
        assert daemon.stop() == 0


def test_live_moves_update_the_index(setup) -> None:
    cfg, root, db, _ = setup()
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        write_image(root / "a.jpg", photo(1, 320, 240))
        wait_for(lambda: str(root / "a.jpg") in records(db), 30, "a.jpg indexed")
        (root / "d1").mkdir()
        os.rename(root / "a.jpg", root / "d1" / "a.jpg")
        wait_for(lambda: set(records(db)) == {str(root / "d1" / "a.jpg")}, 30, "file move")
        os.rename(root / "d1", root / "d2")
        wait_for(lambda: set(records(db)) == {str(root / "d2" / "a.jpg")}, 30, "directory move")
        (root / "d2" / "a.jpg").unlink()
        wait_for(lambda: records(db) == {}, 30, "deletion forgotten")
    finally:
        assert daemon.stop() == 0


def test_moves_into_and_out_of_a_root_act_at_once(setup, tmp_path: Path) -> None:
    """A finished file moved in from outside the roots is complete: no settle delay."""
    cfg, root, db, _ = setup(settle_seconds=60)
    outside = tmp_path / "downloads"
    outside.mkdir()
    write_image(outside / "in.jpg", photo(2, 320, 240))
    write_image(outside / "d" / "deep.jpg", photo(3, 320, 240))
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        os.rename(outside / "in.jpg", root / "in.jpg")
        os.rename(outside / "d", root / "d")
        want = {str(root / "in.jpg"), str(root / "d" / "deep.jpg")}
        wait_for(lambda: set(records(db)) == want, 20, "moved-in files indexed before the "
                 "60 s settle timer")
        os.rename(root / "in.jpg", outside / "back.jpg")
        wait_for(lambda: set(records(db)) == {str(root / "d" / "deep.jpg")}, 20,
                 "a file moved out forgotten")
    finally:
        assert daemon.stop() == 0


def test_a_new_file_at_a_moved_away_path_is_decided(setup, tmp_path: Path) -> None:
    """A file moved out of the roots keeps its record for a grace; a new file at its
    path meanwhile (a hard link: only IN_CREATE, so it settles) cancels that forget. The
    forget used to take the new file's queue entry with it: never decided."""
    cfg, root, db, _ = setup(settle_seconds=3)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_image(root / "a.jpg", photo(2, 320, 240))
    other = write_image(outside / "b.jpg", photo(3, 320, 240))
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        wait_for(lambda: records(db).get(str(root / "a.jpg")) == "kept", 20, "a.jpg kept")
        os.rename(root / "a.jpg", outside / "a.jpg")
        os.link(other, root / "a.jpg")  # settles 3 s: longer than the 2 s grace
        wait_for(lambda: daemon.log().count(f"{root / 'a.jpg'}: accepted") == 2, 30,
                 "the new a.jpg decided")
        assert records(db) == {str(root / "a.jpg"): "kept"}
    finally:
        assert daemon.stop() == 0


def test_a_file_renamed_over_another_leaves_no_stale_record(setup, tmp_path: Path) -> None:
    """The newcomer trial: `mv a.jpg b.jpg` over an indexed b.jpg kept a's record, so a
    later byte copy of a was taken for a.jpg moved, and kept beside b.jpg, unlogged."""
    cfg, root, db, quarantine = setup()
    a = write_image(root / "a.jpg", photo(4, 320, 240))
    write_image(root / "b.jpg", photo(5, 320, 240))
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        wait_for(lambda: len(records(db)) == 2, 20, "a and b kept")
        data = a.read_bytes()
        os.rename(a, root / "b.jpg")
        wait_for(lambda: set(records(db)) == {str(root / "b.jpg")}, 20, "one record left")
        (root / "c.jpg").write_bytes(data)
        wait_for(lambda: records(db).get(str(root / "c.jpg")) is None
                 and not (root / "c.jpg").exists(), 20, "c.jpg quarantined")
        assert "c.jpg: duplicate of " in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_bad_input_is_logged_and_daemon_stays_healthy(setup, tmp_path: Path) -> None:
    cfg, root, db, _ = setup(rejected_dir=str(tmp_path / "rejected"))
    # Without CAP_DAC_OVERRIDE even root obeys file modes, as the unprivileged service does.
    no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log", prefix=no_dac).start()
    outside = tmp_path / "outside.jpg"
    write_image(outside, photo(5, 320, 240))
    try:
        good = encode(photo(9, 320, 240))
        (root / "zero.jpg").write_bytes(b"")
        (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (root / "text.jpg").write_bytes(b"hello, I am not an image\n" * 20)
        corrupt = bytearray(good)
        corrupt[4:400] = b"\x00" * 396  # the marker segments after SOI smashed
        (root / "corrupt.jpg").write_bytes(bytes(corrupt))
        staged, locked = tmp_path / "locked.jpg", root / "locked.jpg"
        staged.write_bytes(good)
        staged.chmod(0)  # mode 000: nobody may read it (the daemon has no DAC override)
        os.rename(staged, locked)
        # A PNG whose header declares 100k x 100k pixels: refused before decoding.
        png = bytearray(cv2.imencode(".png", photo(3, 16, 16))[1].tobytes())
        png[16:24] = (100_000).to_bytes(4, "big") * 2
        (root / "bomb.png").write_bytes(bytes(png))
        os.symlink(outside, root / "link.jpg")
        os.mkfifo(root / "fifo.jpg")
        log = daemon.log
        for name, kind in (("zero.jpg", "empty"), ("truncated.jpg", "truncated"),
                           ("text.jpg", "unsupported"), ("bomb.png", "too_large"),
                           ("link.jpg", "not_regular"), ("corrupt.jpg", "corrupt"),
                           ("locked.jpg", "unreadable")):
            wait_for(lambda n=name, k=kind: f"{n}: {k}" in log(), 30, f"{name} rejected")
        # Moved to rejected/ or left in place, never lost; the symlink target untouched.
        assert (root / "truncated.jpg").exists() and locked.exists()
        for name in ("zero.jpg", "text.jpg", "bomb.png", "corrupt.jpg"):
            assert not (root / name).exists()
            assert list((tmp_path / "rejected").rglob(name))
        assert outside.exists() and (root / "link.jpg").is_symlink()
        # Still healthy: a good image is accepted afterwards.
        (root / "good.jpg").write_bytes(good)
        wait_for(lambda: records(db).get(str(root / "good.jpg")) == "kept", 30, "good image")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_sighup_reload_good_and_bad(setup, tmp_path: Path) -> None:
    cfg, root, db, _ = setup()
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    second = tmp_path / "second"
    second.mkdir()
    try:
        good = cfg.read_text()
        cfg.write_text(good.replace("watches:", f"watches:\n- path: {second}"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in daemon.log(), 30, "reload")
        write_image(second / "x.jpg", photo(11, 320, 240))
        wait_for(lambda: str(second / "x.jpg") in records(db), 30, "new root watched")
        cfg.write_text(cfg.read_text() + "\nbogus_key: 1\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in daemon.log(), 30, "reload failure reported")
        assert "bogus_key: unknown key" in daemon.log()
        write_image(second / "y.jpg", photo(12, 320, 240))
        wait_for(lambda: str(second / "y.jpg") in records(db), 30, "old config kept")
    finally:
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 25


def test_reload_to_an_unwatchable_root_keeps_the_old_watches(setup, tmp_path: Path) -> None:
    cfg, root, db, _ = setup()
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        cfg.write_text(cfg.read_text().replace("watches:",
                                               f"watches:\n- path: {tmp_path / 'missing'}"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in daemon.log(), 30, "reload failure reported")
        assert "not a directory" in daemon.log()
        write_image(root / "after.jpg", photo(13, 320, 240))
        wait_for(lambda: str(root / "after.jpg") in records(db), 30, "old root still watched")
    finally:
        assert daemon.stop() == 0


def test_bad_config_at_start_exits_78(tmp_path: Path) -> None:
    """EX_CONFIG: the unit's RestartPreventExitStatus=78 makes it end `failed`."""
    cfg = write_config(tmp_path / "bad.yaml", {"watches": [{"path": str(tmp_path),
                                                            "recursiv": True}]})
    proc = DaemonProcess(cfg, tmp_path / "log").start(wait_ready=False)
    assert proc.proc.wait(30) == 78
    assert "watches[0].recursiv: unknown key" in proc.log()
    proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to lower fs.inotify.max_queued_events")
def test_inotify_overflow_triggers_rescan(setup) -> None:
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    try:
        saved = knob.read_text()
        knob.write_text("16\n")
    except OSError as exc:
        pytest.skip(f"cannot change {knob}: {exc}")
    cfg, root, db, _ = setup()
    try:
        daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    finally:
        knob.write_text(saved)  # the daemon's inotify instance keeps the tiny queue
    try:
        data = [encode(photo(s, 160, 120)) for s in range(200)]
        for i, d in enumerate(data):
            (root / f"f{i:03d}.jpg").write_bytes(d)
        wait_for(lambda: "overflow_rescan" in daemon.log(), 30, "overflow detected")
        wait_for(lambda: len(records(db)) + daemon.log().count("duplicate_quarantined") >= 200,
                 60, "every file decided despite lost events")
    finally:
        assert daemon.stop() == 0


def test_simultaneous_near_identical_files_keep_one(setup) -> None:
    cfg, root, db, quarantine = setup(workers=2)
    daemon = DaemonProcess(cfg, cfg.parent / "daemon.log").start()
    try:
        pairs = distinct_seeds(20, (320, 240))
        for s in pairs:
            img = photo(s, 320, 240)
            a, b = encode(img, 90), encode(img, 60)
            (root / f"{s}_a.jpg.tmp").write_bytes(a)
            (root / f"{s}_b.jpg.tmp").write_bytes(b)
        for s in pairs:  # both renamed into place at the same instant
            os.rename(root / f"{s}_a.jpg.tmp", root / f"{s}_a.jpg")
            os.rename(root / f"{s}_b.jpg.tmp", root / f"{s}_b.jpg")
        # A move links into the quarantine, then unlinks: wait for both sides.
        wait_for(lambda: len(files_under(quarantine)) == 20 and len(files_under(root)) == 20,
                 60, "one of each pair quarantined")
        kept = {Path(p).name.split("_")[0] for p, st in records(db).items() if st == "kept"}
        assert kept == {str(s) for s in pairs}
    finally:
        assert daemon.stop() == 0


def test_release_free_heap_returns_fragmented_memory() -> None:
    # A fresh interpreter, so the heap's state is known: large blocks served from the
    # heap, pinned apart by small live ones. Freeing them leaves RSS where it was until
    # the trim. The mmap threshold is fixed (M_MMAP_THRESHOLD = -3) rather than left to
    # adapt after a first big free: whether the adaptive one had risen depended on what
    # the imports happened to allocate, and the blocks were then sometimes mmapped.
    import subprocess
    import sys

    script = """
from dedupd.daemon import release_free_heap
def rss_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
import ctypes
ctypes.CDLL(None).mallopt(-3, 4 << 20)
keep, holes = [], []
for _ in range(200):
    holes.append(bytearray(300_000))
    keep.append(bytearray(100_000))  # too big for a fragment imports left: it pins
del holes
freed = rss_kib()
trimmed = release_free_heap()
print(freed, rss_kib(), trimmed)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    freed, after, trimmed = int(out[0]), int(out[1]), out[2] == "True"
    assert trimmed, "no malloc_trim in this C library"
    assert freed - after > 40_000, f"RSS {freed} -> {after} KiB: the holes stayed resident"
