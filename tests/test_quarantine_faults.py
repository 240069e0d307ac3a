"""Quarantine and restore under file-system faults: real mounts (tmpfs for EXDEV and
ENOSPC, a read-only bind mount for EROFS) and every call of the move paths failing in
turn. Whatever fails, each file exists exactly once (in its root or in quarantine), no
partial copy or orphan is left, and start-up repair never raises."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import photo, write_image

from dedupd.quarantine import PARTIAL_PREFIX, Quarantine, QuarantineError, fit_name, sidecar_path
from dedupd.store import ImageRecord, open_store
from dedupd.store.base import ALLOWED, DONE, QUARANTINED, RESTORED, RESTORING, ROLLED_BACK

ERRNOS = (errno.ENOSPC, errno.EXDEV, errno.EACCES, errno.EROFS, errno.EIO)
# The calls the move-in and restore paths make (directly or through pathlib/shutil).
CALLS = ("link", "unlink", "rename", "replace", "open", "fsync", "chown", "utime", "chmod",
         "mkdir", "copyfile")
TOTALS = {"faults": 0, "lost": 0, "runs": 0}


def need_root_mounts() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs / read-only bind mount")


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """mount(kind, where, **opts): a real tmpfs or read-only bind mount, undone after."""
    mounted: list[Path] = []

    def make(kind: str, where: Path, source: Path | None = None, size: str = "4m") -> Path:
        need_root_mounts()
        where.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            cmd = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]]
        else:
            cmd = [["mount", "--bind", str(source), str(where)],
                   ["mount", "-o", "remount,bind,ro", str(where)]]
        for c in cmd:
            done = subprocess.run(c, capture_output=True, text=True)
            if done.returncode != 0:
                if mounted and mounted[-1] == where:
                    subprocess.run(["umount", str(where)], check=False)
                pytest.skip(f"cannot mount here: {done.stderr.strip()}")
            if where not in mounted:
                mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def record(path: Path) -> ImageRecord:
    return ImageRecord(scope="s", path=str(path), recipe="dhash:8:fast:area:v1", hash=5,
                       digest=hashlib.sha256(path.read_bytes()).hexdigest(),
                       file_size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns,
                       width=10, height=10)


def quarantine(q: Quarantine, src: Path, root: Path):
    return q.move_in(src, root, record=record(src), matched_path="/m.jpg", distance=1,
                     hash_hex="05", policy="p")


def copies(content: bytes, *dirs: Path) -> list[Path]:
    """Every file under dirs holding exactly `content` (sidecars aside)."""
    found = []
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file() and not p.name.endswith(".json") and p.read_bytes() == content:
                found.append(p)
    return found


def partials(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob(f"{PARTIAL_PREFIX}*")]


def test_restore_across_file_systems_preserves_owner_mode_mtime(tmp_path: Path, mount) -> None:
    """#12-4 and #11-3: with the quarantine on a tmpfs, restore moves the file back (it
    used to fail with EXDEV, mark the entry restored, leave a partial and crash every
    later start), and both copies keep owner, mode and mtime."""
    qdir = mount("tmpfs", tmp_path / "qfs")
    root = tmp_path / "root"
    src = write_image(root / "sub" / "x.jpg", photo(1, 64, 48))
    os.chown(src, 1234, 2345)
    os.chmod(src, 0o640)
    os.utime(src, ns=(1_000_000_000_123, 1_500_000_000_456_789_000))
    before = src.stat()
    content = src.read_bytes()
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        q = Quarantine(store, qdir)
        entry = quarantine(q, src, root)
        moved = Path(entry.quarantine_path)
        for st in (moved.stat(),):
            assert (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
                before.st_uid, before.st_gid, before.st_mode, before.st_mtime_ns)
        back = q.restore(entry)
        assert back == src and src.read_bytes() == content and not moved.exists()
        st = src.stat()
        assert (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
            before.st_uid, before.st_gid, before.st_mode, before.st_mtime_ns)
        assert store.get_quarantine(entry.id).state == RESTORED
        assert store.get_by_path(str(src)).status == ALLOWED
        assert not partials(root, qdir) and not sidecar_path(moved).exists()
        assert q.reconcile(lambda e: None)["failed"] == 0
    finally:
        store.close()


def test_a_restore_an_old_dedupd_left_half_done_is_repaired(tmp_path: Path, mount) -> None:
    """The state the EXDEV bug left: journal `restored`, file still in quarantine on
    another file system, a partial beside it. Start-up repair moves it back."""
    qdir = mount("tmpfs", tmp_path / "qfs")
    root = tmp_path / "root"
    src = write_image(root / "x.jpg", photo(2, 64, 48))
    content = src.read_bytes()
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        q = Quarantine(store, qdir)
        entry = quarantine(q, src, root)
        store.update_quarantine(entry.__class__(**{**entry.__dict__, "state": RESTORED}))
        (qdir / f"{PARTIAL_PREFIX}{entry.id}").write_bytes(content[:100])
        done = q.reconcile(lambda e: None)
        assert done["restored"] == 1 and done["failed"] == 0
        assert src.read_bytes() == content and not partials(root, qdir)
    finally:
        store.close()


def test_quarantine_fs_full_leaves_the_file_and_no_partial(tmp_path: Path, mount) -> None:
    qdir = mount("tmpfs", tmp_path / "qfs", size="64k")
    root = tmp_path / "root"
    src = root / "big.jpg"
    root.mkdir()
    src.write_bytes(os.urandom(300_000))
    content = src.read_bytes()
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        q = Quarantine(store, qdir)
        with pytest.raises(QuarantineError, match="No space"):
            quarantine(q, src, root)
        assert src.read_bytes() == content and copies(content, root, qdir) == [src]
        assert not partials(root, qdir)
        assert [e.state for e in store.list_quarantine()] == [ROLLED_BACK]
    finally:
        store.close()


def test_a_read_only_quarantine_is_a_quarantine_error(tmp_path: Path, mount) -> None:
    """A quarantine file system remounted read-only (ext4's errors=remount-ro) after the
    start-up check: making the target's directory failed with a raw OSError, which
    aborted `dedupd scan` at the first duplicate and left a traceback in the daemon's
    log instead of an unresolved duplicate. Now a QuarantineError; the file stays."""
    src = write_image(tmp_path / "root" / "d" / "x.jpg", photo(4, 64, 48))
    (tmp_path / "qreal").mkdir()
    qdir = mount("bind-ro", tmp_path / "q", source=tmp_path / "qreal")
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        with pytest.raises(QuarantineError, match="Read-only"):
            quarantine(Quarantine(store, qdir), src, tmp_path / "root")
        assert src.exists() and not [p for p in qdir.rglob("*")]
        assert [e.state for e in store.list_quarantine()] == []
    finally:
        store.close()


def test_unlink_refused_by_a_read_only_root_leaves_no_orphan(tmp_path: Path, mount) -> None:
    """#11-4: the copy into quarantine succeeded, removing the original failed (EROFS):
    the copy is rolled back, nothing is left in the quarantine dir."""
    real = tmp_path / "real"
    src_real = write_image(real / "x.jpg", photo(3, 64, 48))
    content = src_real.read_bytes()
    root = mount("bind-ro", tmp_path / "ro", source=real)
    qdir = tmp_path / "q"
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        q = Quarantine(store, qdir)
        with pytest.raises(QuarantineError, match="Read-only"):
            quarantine(q, root / "x.jpg", root)
        assert copies(content, real, qdir) == [src_real]
        assert not [p for p in qdir.rglob("*") if p.is_file()]
    finally:
        store.close()


class Faults:
    """Make the nth call of one os/shutil function on paths under `scope` fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, scope: Path, call: str, err: int,
                 nth: int) -> None:
        self.scope, self.err, self.nth, self.seen, self.fired = str(scope), err, nth, 0, False
        module = shutil if call == "copyfile" else os
        real = getattr(module, call)

        def faulty(*args, **kwargs):
            first = args[0] if args else None
            if isinstance(first, (str, bytes, os.PathLike)) and \
                    os.fsdecode(first).startswith(self.scope) or (call == "fsync"):
                self.seen += 1
                if self.seen == self.nth:
                    self.fired = True
                    raise OSError(self.err, os.strerror(self.err), str(first))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, call, faulty)


def check_one_copy(content: bytes, root: Path, qdir: Path, *, repaired: bool = True) -> int:
    """Files lost (0) — asserts there is exactly one copy. Before start-up repair, a
    partial may stay only as a second name of that copy (a cross-file-system move whose
    temporary name could not be removed after it was linked into place); after, none."""
    found = copies(content, root, qdir)
    left = partials(root, qdir)
    if not repaired:
        found = [p for p in found if p not in left or
                 not any(o not in left and os.path.samefile(p, o) for o in found)]
        left = [p for p in left if p not in found]
    assert len(found) <= 1, f"duplicated: {found}"
    assert not [p for p in left if repaired or not found
                or not os.path.samefile(p, found[0])], left
    return 1 - len(found)


@pytest.mark.parametrize("cross_fs", [False, True], ids=["same-fs", "tmpfs"])
@pytest.mark.parametrize("call", CALLS)
def test_every_failing_call_keeps_each_file_exactly_once(tmp_path: Path, mount,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         call: str, cross_fs: bool) -> None:
    """For each call and errno, fail its 1st, 2nd, ... use during a quarantine and then
    during a restore; after every failure the file is in one place, and start-up repair
    (also under the same fault) neither raises nor loses it."""
    qdir = mount("tmpfs", tmp_path / "qfs") if cross_fs else tmp_path / "q"
    faults = lost = 0
    for err in ERRNOS:
        for nth in range(1, 6):
            case = tmp_path / f"case-{err}-{nth}"
            root = case / "root"
            src = write_image(root / "d" / "x.jpg", photo(nth, 48, 32))
            content = src.read_bytes()
            store = open_store(str(case / "i.sqlite"))
            q = Quarantine(store, qdir / case.name)
            try:
                with monkeypatch.context() as m:
                    fault = Faults(m, tmp_path, call, err, nth)
                    try:
                        entry = quarantine(q, src, root)
                    except (QuarantineError, OSError):
                        entry = None
                    faults += fault.fired
                if entry is None or entry.state != DONE:
                    # A failed move leaves the file in place, or (cleanup failed too)
                    # a pending entry that start-up repair finishes.
                    q.reconcile(lambda e: record(Path(e.quarantine_path)))
                    lost += check_one_copy(content, root, q.directory)
                    continue
                lost += check_one_copy(content, root, q.directory, repaired=False)
                with monkeypatch.context() as m:
                    fault = Faults(m, tmp_path, call, err, nth)
                    with contextlib.suppress(QuarantineError, OSError):
                        q.restore(entry)
                    faults += fault.fired
                    state = store.get_quarantine(entry.id).state
                    assert state in (DONE, RESTORED, RESTORING)
                    if state != RESTORING:  # else: cleanup failed, repaired below
                        lost += check_one_copy(content, root, q.directory, repaired=False)
                        assert (state == RESTORED) == src.exists()
                    counts = q.reconcile(lambda e: None)  # repair under the same fault
                    faults += fault.fired
                lost += check_one_copy(content, root, q.directory)
                if counts["failed"] == 0:
                    state = store.get_quarantine(entry.id).state
                    assert state in (DONE, RESTORED)
                    assert (state == RESTORED) == src.exists()
                    assert src.exists() != Path(entry.quarantine_path).exists()
            finally:
                store.close()
    TOTALS["faults"] += faults
    TOTALS["lost"] += lost
    TOTALS["runs"] += 1
    print(f"\nfault injection {call} cross_fs={cross_fs}: {faults} faults injected, "
          f"{lost} files lost (running total: {TOTALS})")
    assert lost == 0
    assert faults > 0 or call in ("chown", "utime", "chmod", "copyfile", "replace", "rename")
def test_names_of_255_bytes_and_any_bytes_are_quarantined(tmp_path: Path) -> None:
    """#12-6: the sidecar of a 251-255 byte name fits (hash-shortened); non-UTF-8 bytes
    survive the sidecar's JSON (escaped) and the store."""
    import json

    root = tmp_path / "root"
    store = open_store(str(tmp_path / "i.sqlite"))
    try:
        q = Quarantine(store, tmp_path / "q")
        names = ["a" * 251 + ".jpg", os.fsdecode(b"bad\xff\xfe name\n.jpg"),
                 os.fsdecode(b"\xe9" * 250 + b".jpg")]
        for i, name in enumerate(names):
            src = write_image(root / name, photo(10 + i, 32, 32))
            entry = quarantine(q, src, root)
            moved = Path(entry.quarantine_path)
            assert moved.name == name and not src.exists()
            side = sidecar_path(moved)
            assert len(os.fsencode(side.name)) <= 255
            loaded = json.loads(side.read_text(encoding="utf-8"))
            assert os.fsencode(loaded["original_path"]) == os.fsencode(str(src))
            assert store.get_by_path(str(moved)).status == QUARANTINED
            # A second file of the same long name gets a free, fitting name.
            again = write_image(root / name, photo(20 + i, 32, 32))
            other = Path(quarantine(q, again, root).quarantine_path)
            assert other != moved and len(os.fsencode(other.name)) <= 255
            assert q.restore(store.get_quarantine(entry.id)) == src and src.exists()
    finally:
        store.close()
    assert len(os.fsencode(fit_name("é" * 200, ".json"))) <= 255




@pytest.mark.parametrize("state", ["pending", "done", "restoring", "restored", "rolled_back",
                                   "purged", "bogus"])
def test_start_up_repair_survives_every_journal_state(tmp_path: Path, state: str) -> None:
    """Every journal state × the file at its origin, in quarantine, at both (same or
    different bytes), or nowhere, with a partial copy lying about: repair never raises,
    leaves no partial, and never leaves a file's bytes at two places or none."""
    from dataclasses import replace as dc_replace

    layouts = ["origin", "quarantine", "both-same", "both-differ", "none"]
    for n, layout in enumerate(layouts):
        case = tmp_path / f"{state}-{layout}"
        root, qdir = case / "root", case / "q"
        store = open_store(str(case / "i.sqlite"))
        try:
            q = Quarantine(store, qdir)
            src = write_image(root / "x.jpg", photo(50 + n, 32, 32))
            content = src.read_bytes()
            entry = quarantine(q, src, root)
            dst = Path(entry.quarantine_path)
            if layout in ("origin", "both-same", "both-differ", "none"):
                os.link(dst, src) if layout == "both-same" else shutil.copy2(dst, src)
                if layout == "both-differ":
                    src.write_bytes(b"someone else's file")
                if layout in ("origin", "none"):
                    dst.unlink()
                if layout == "none":
                    src.unlink()
            # Partials where a crash can leave them: top of the quarantine dir, beside
            # the target of a move in (pending) or out (restoring).
            (qdir / f"{PARTIAL_PREFIX}{entry.id}").write_bytes(b"half")
            beside = {"pending": dst.parent, "restoring": src.parent}.get(state)
            if beside is not None and beside.exists():
                (beside / f"{PARTIAL_PREFIX}{entry.id}").write_bytes(b"half")
            if state == "pending" and dst.parent.exists():  # a sidecar being written
                (dst.parent / f"{PARTIAL_PREFIX}sidecar-{entry.id}").write_text("{")
            store.update_quarantine(dc_replace(entry, state=state))
            q.reconcile(lambda e: record(Path(e.quarantine_path)))  # never raises
            assert not partials(root, qdir), (state, layout)
            if state in ("pending", "restoring", "restored"):  # states repair acts on
                found = copies(content, root, qdir)
                assert len(found) == (0 if layout == "none" else 1), (state, layout, found)
        finally:
            store.close()
