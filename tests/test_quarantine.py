"""Quarantine moves: every half-done state a crash can leave is finished or undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import photo, write_image

from dedupd.quarantine import PARTIAL_PREFIX, Quarantine, QuarantineError
from dedupd.store import ImageRecord, QuarantineEntry, open_store
from dedupd.store.base import ALLOWED, DONE, PENDING, PURGED, QUARANTINED, RESTORED, ROLLED_BACK


@pytest.fixture
def env(tmp_path: Path):
    root = tmp_path / "root"
    store = open_store(str(tmp_path / "i.sqlite"))
    q = Quarantine(store, tmp_path / "q")
    yield root, store, q
    store.close()


def record(path: Path, **kw) -> ImageRecord:
    return ImageRecord(scope="s", path=str(path), recipe="dhash:8:fast:area:v1", hash=5,
                       digest="d" + path.name, file_size=path.stat().st_size, mtime_ns=1,
                       width=10, height=10, **kw)


def no_rehash(entry: QuarantineEntry) -> ImageRecord | None:
    raise AssertionError("rehash not expected")


def test_move_in_keeps_relative_origin_sidecar_and_record(env) -> None:
    root, store, q = env
    src = write_image(root / "a" / "b" / "x.jpg", photo(1, 64, 48))
    entry = q.move_in(src, root, record=record(src), matched_path="/m.jpg", distance=2,
                      hash_hex="0000000000000005", policy="default")
    dst = Path(entry.quarantine_path)
    assert not src.exists() and dst.exists()
    assert dst.relative_to(q.directory.resolve()).parts[-3:] == ("a", "b", "x.jpg")
    side = json.loads(dst.with_name("x.jpg.json").read_text())
    assert side["original_path"] == str(src) and side["matched_path"] == "/m.jpg"
    assert store.get_by_path(str(dst)).status == QUARANTINED
    assert entry.state == DONE
    # A second file of the same name does not overwrite the first.
    src2 = write_image(root / "a" / "b" / "x.jpg", photo(2, 64, 48))
    entry2 = q.move_in(src2, root, record=record(src2), matched_path="/m.jpg", distance=1,
                       hash_hex="0", policy="default")
    assert entry2.quarantine_path != entry.quarantine_path and dst.exists()


def test_a_record_forgotten_mid_move_is_written_at_the_target(env, monkeypatch) -> None:
    """The watcher may forget a record (its file just left the root: the quarantine
    move itself) between the move's read of it and its update: the move completes with
    a record at the target, not with a false store outage ("no image record N")."""
    root, store, q = env
    src = write_image(root / "x.jpg", photo(3, 64, 48))
    rec = store.insert(record(src))
    real_update = store.update

    def forgotten_first(new: ImageRecord) -> None:
        if new.id == rec.id:
            store.delete(rec.id)  # the watcher's forget, in the window
        real_update(new)

    monkeypatch.setattr(store, "update", forgotten_first)
    entry = q.move_in(src, root, record=rec, matched_path="/m.jpg", distance=0,
                      hash_hex="0000000000000005", policy="default")
    monkeypatch.undo()
    stored = store.get_by_path(entry.quarantine_path)
    assert entry.state == DONE and stored is not None and stored.status == QUARANTINED
    assert Path(entry.quarantine_path).exists() and not src.exists()


def test_the_journal_keeps_how_a_file_matched(env) -> None:
    """#17: a flip or rotation, and a hash that says little, stay in the journal entry."""
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 64, 48))
    entry = q.move_in(src, root, record=record(src), matched_path="/m.jpg", distance=2,
                      hash_hex="05", policy="p", transform="hflip", low_information=True)
    stored = store.get_quarantine(entry.id)
    assert (stored.transform, stored.low_information) == ("hflip", True)
    assert (entry.transform, entry.low_information) == ("hflip", True)


def test_a_users_file_named_like_a_partial_is_never_removed(env) -> None:
    """Start-up repair, restore and purge remove an entry's temporary names; beside the
    original path (a user's directory) only a second name of that very file, never a
    user's own file that happens to be called .dedupd-partial-N."""
    root, store, q = env
    a = write_image(root / "d" / "a.jpg", photo(1, 32, 32))
    b = write_image(root / "d" / "b.jpg", photo(2, 32, 32))
    ea = q.move_in(a, root, record=record(a), matched_path="/m", distance=1, hash_hex="0",
                   policy="p")
    eb = q.move_in(b, root, record=record(b), matched_path="/m", distance=1, hash_hex="0",
                   policy="p")
    q.restore(store.get_quarantine(ea.id))
    mine = [root / "d" / f"{PARTIAL_PREFIX}{e.id}" for e in (ea, eb)]
    for path in mine:
        path.write_bytes(b"the user's own bytes")
    q.reconcile(no_rehash)
    q.purge_entry(store.get_quarantine(eb.id))
    assert [p.read_bytes() for p in mine] == [b"the user's own bytes"] * 2


def test_names_cannot_escape_the_quarantine_dir(env, tmp_path: Path) -> None:
    root, store, q = env
    q.directory.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # An attacker-made symlink inside the quarantine dir must not redirect moves.
    os.symlink(outside, q.directory / str(root).lstrip("/").split("/")[0])
    src = write_image(root / "evil.jpg", photo(3, 32, 32))
    with pytest.raises(QuarantineError, match="escapes"):
        q.move_in(src, root, record=record(src), matched_path="/m", distance=0,
                  hash_hex="0", policy="p")
    assert src.exists() and not list(outside.rglob("*.jpg"))
    odd = write_image(root / "$(touch pwned); rm -rf ~ .jpg", photo(4, 32, 32))
    (q.directory / str(root).lstrip("/").split("/")[0]).unlink()
    entry = q.move_in(odd, root, record=record(odd), matched_path="/m", distance=0,
                      hash_hex="0", policy="p")
    assert Path(entry.quarantine_path).name == odd.name  # names are data


def pending(store, src: Path, dst: Path, image_id: int | None = None) -> QuarantineEntry:
    return store.add_quarantine(QuarantineEntry(
        original_path=str(src), quarantine_path=str(dst), matched_path="/m", distance=1,
        hash="05", policy="p", image_id=image_id))


def test_reconcile_rolls_back_when_the_move_never_happened(env) -> None:
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 32, 32))
    entry = pending(store, src, q.directory / "x.jpg")
    assert q.reconcile(no_rehash)["rolled_back"] == 1
    assert src.exists() and store.get_quarantine(entry.id).state == ROLLED_BACK


def test_reconcile_completes_a_finished_rename(env) -> None:
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 32, 32))
    dst = q.directory / "x.jpg"
    dst.parent.mkdir(parents=True)
    entry = pending(store, src, dst)
    os.rename(src, dst)  # the crash came after the rename, before the journal said DONE
    rebuilt = record(dst)
    assert q.reconcile(lambda e: rebuilt)["completed"] == 1
    # Handed back for its report: the crash came before duplicate_quarantined was said.
    assert [e.id for e in q.repaired] == [entry.id] and q.repaired[0].state == DONE
    assert store.get_quarantine(entry.id).state == DONE
    assert store.get_by_path(str(dst)).status == QUARANTINED
    assert dst.with_name("x.jpg.json").exists()


def test_reconcile_resolves_two_names_for_one_file(env) -> None:
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 32, 32))
    kept = store.insert(record(src))
    dst = q.directory / "x.jpg"
    dst.parent.mkdir(parents=True)
    entry = pending(store, src, dst, image_id=kept.id)
    os.link(src, dst)  # crash between link and unlink
    (q.directory / f"{PARTIAL_PREFIX}9").write_bytes(b"half a copy")
    q.reconcile(no_rehash)
    assert dst.exists() and not src.exists()
    assert not list(q.directory.glob(f"{PARTIAL_PREFIX}*"))
    assert store.get(kept.id).path == str(dst)
    assert store.get_quarantine(entry.id).state == DONE


def test_reconcile_keeps_both_files_if_the_copies_differ(env) -> None:
    """A move's target only appears complete (linked into place after fsync), so bytes
    at the origin that differ are a new file someone wrote there: neither is deleted."""
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 32, 32))
    dst = q.directory / "x.jpg"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"not the same bytes")
    entry = pending(store, src, dst)
    q.reconcile(lambda e: record(dst))
    assert src.exists() and dst.read_bytes() == b"not the same bytes"
    assert store.get_quarantine(entry.id).state == DONE


def test_restore_and_crash_during_restore(env) -> None:
    root, store, q = env
    src = write_image(root / "x.jpg", photo(1, 32, 32))
    entry = q.move_in(src, root, record=record(src), matched_path="/m", distance=1,
                      hash_hex="05", policy="p")
    back = q.restore(q.find(str(src)))
    assert back == src and src.exists() and not Path(entry.quarantine_path).exists()
    assert store.get_by_path(str(src)).status == ALLOWED
    with pytest.raises(QuarantineError):
        q.restore(store.get_quarantine(entry.id))
    # Crash after the journal said RESTORED but before the rename: reconcile finishes it.
    y = write_image(root / "y.jpg", photo(2, 32, 32))
    e2 = q.move_in(y, root, record=record(y), matched_path="/m", distance=1, hash_hex="05",
                   policy="p")
    store.update_quarantine(replace(e2, state=RESTORED))
    assert q.reconcile(no_rehash)["restored"] == 1
    assert y.exists() and not Path(e2.quarantine_path).exists()


def test_purge_and_files_removed_by_hand(env) -> None:
    root, store, q = env
    a = write_image(root / "a.jpg", photo(1, 32, 32))
    b = write_image(root / "b.jpg", photo(2, 32, 32))
    ea = q.move_in(a, root, record=record(a), matched_path="/m", distance=1, hash_hex="0",
                   policy="p")
    eb = q.move_in(b, root, record=record(b), matched_path="/m", distance=1, hash_hex="0",
                   policy="p")
    assert q.purge(1, dry_run=True) == []
    assert [e.id for e in q.purge(-1, dry_run=True)] == [ea.id, eb.id]
    assert Path(ea.quarantine_path).exists()
    Path(eb.quarantine_path).unlink()  # an operator cleaned up by hand
    assert q.reconcile(no_rehash)["purged"] == 1
    assert store.get_by_path(eb.quarantine_path) is None
    q.purge(-1)
    assert not Path(ea.quarantine_path).exists()
    assert store.get_quarantine(ea.id).state == PURGED
    assert store.list_quarantine((DONE, PENDING)) == []


def test_purge_and_restore_leave_no_empty_directories(env) -> None:
    """#12: purge (and restore, and a file removed by hand) pruned nothing: the
    quarantine kept an empty copy of every root's tree. Only emptied directories go,
    never the quarantine directory itself nor one still holding a file."""
    root, store, q = env
    moved = []
    for name in ("a/b/c/x.jpg", "a/b/y.jpg", "d/e/z.jpg", "f/g/w.jpg"):
        src = write_image(root / name, photo(len(moved) + 1, 32, 32))
        moved.append(q.move_in(src, root, record=record(src), matched_path="/m", distance=1,
                               hash_hex="0", policy="p"))
    x, y, z, w = moved
    keep = Path(y.quarantine_path).parent  # .../a/b still holds y
    q.purge_entry(x)
    assert not Path(x.quarantine_path).parent.exists() and keep.is_dir()
    q.restore(z)
    assert not Path(z.quarantine_path).parent.parent.exists()  # .../d gone with .../d/e
    assert (root / "d" / "e" / "z.jpg").exists()
    Path(w.quarantine_path).unlink()
    Path(w.quarantine_path).with_name("w.jpg.json").unlink()
    assert q.reconcile(no_rehash)["purged"] == 1
    assert not Path(w.quarantine_path).parent.parent.exists()
    q.purge(-1)
    assert q.directory.is_dir() and list(q.directory.iterdir()) == []


def test_move_in_racing_a_prune_makes_the_directory_again(env) -> None:
    """A purge in another process may remove the directory target_for just made: the
    move retries with the directory made again instead of failing the quarantine."""
    root, store, q = env
    src = write_image(root / "a" / "x.jpg", photo(1, 32, 32))
    real_target_for, raced = q.target_for, []

    def target_for(original: Path, root_: Path | None) -> Path:
        target = real_target_for(original, root_)
        if not raced:
            raced.append(target)
            q._prune(target.parent)  # what a concurrent purge of a sibling does
        return target

    q.target_for = target_for  # type: ignore[method-assign]
    entry = q.move_in(src, root, record=record(src), matched_path="/m", distance=1,
                      hash_hex="0", policy="p")
    assert raced and not src.exists() and Path(entry.quarantine_path).exists()
    assert [e.state for e in store.list_quarantine()] == [ROLLED_BACK, DONE]


def dedupd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dedupd", *args], capture_output=True,
                          text=True, timeout=60)


def test_quarantine_cli_list_restore_purge(tmp_path: Path, config_file) -> None:
    cfg = config_file()
    store = open_store(str(tmp_path / "state" / "index.sqlite"))
    q = Quarantine(store, tmp_path / "state" / "quarantine")
    src = write_image(tmp_path / "root" / "x.jpg", photo(1, 32, 32))
    entry = q.move_in(src, tmp_path / "root", record=record(src), matched_path="/m",
                      distance=3, hash_hex="05", policy="p")
    store.close()
    listed = json.loads(dedupd("--config", str(cfg), "quarantine", "list", "--json").stdout)
    assert [e["original_path"] for e in listed] == [str(src)]
    assert dedupd("--config", str(cfg), "restore", "999").returncode == 2
    out = dedupd("--config", str(cfg), "restore", str(entry.id))
    assert out.returncode == 0, out.stderr
    assert src.exists()
    assert json.loads(dedupd("--config", str(cfg), "quarantine", "list", "--json").stdout) == []
    purge = dedupd("--config", str(cfg), "quarantine", "purge", "--older-than", "0", "--json")
    assert purge.returncode == 0 and json.loads(purge.stdout)["purged"] == []
    assert src.exists()


def test_the_pipeline_journals_how_a_file_matched(tmp_path: Path) -> None:
    """#17: a mirrored copy's journal entry says how it matched (the act passes it on)."""
    import cv2
    from daemonproc import write_config

    from dedupd.config import load_config
    from dedupd.hashing import hash_file
    from dedupd.pipeline import Pipeline

    root = tmp_path / "data"
    root.mkdir()
    cfg = load_config(write_config(tmp_path / "c.yaml", {
        "index": str(tmp_path / "i.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "watches": [{"path": str(root)}],
        "policies": {"default": {"max_distance": 6, "match_flips_rotations": True}}}))
    store = open_store(cfg.index)
    try:
        pipeline = Pipeline(cfg, store)
        img = photo(42, 320, 240)
        for path in (write_image(root / "a.jpg", img),
                     write_image(root / "b.jpg", cv2.flip(img, 1))):
            pipeline.ingest(path, cfg.watches[0], hash_file(path, cfg.recipe, cfg.max_pixels),
                            path.stat().st_mtime_ns, None)
        [entry] = store.list_quarantine((DONE,))
        assert entry.original_path == str(root / "b.jpg") and entry.transform
    finally:
        store.close()
