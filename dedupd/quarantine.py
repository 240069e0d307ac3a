"""Crash-safe moves into and out of the quarantine directory.

Protocol (never lose an image): the intent is journalled in the store before any rename;
the move itself is link+unlink (no-replace, atomic on one file system) or, across file
systems, copy + fsync + rename + unlink; `reconcile()` on start finishes or rolls back
whatever a crash left half-done. Every file ends either at its origin or in quarantine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from dedupd.store.base import (
    ALLOWED,
    DONE,
    PENDING,
    PURGED,
    QUARANTINED,
    RESTORED,
    RESTORING,
    ROLLED_BACK,
    ImageRecord,
    QuarantineEntry,
    RecordGone,
    Store,
    StoreError,
)

log = logging.getLogger("dedupd.quarantine")

PARTIAL_PREFIX = ".dedupd-partial-"
SIDECAR_SUFFIX = ".json"
# The journal entry's reason once an operator restored it saying it was no duplicate.
NOT_A_DUPLICATE = "not_a_duplicate"


class QuarantineError(Exception):
    """A move could not be done; the file is where it was."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str, tmp: Path) -> None:
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


NAME_MAX = 255  # bytes per file name on Linux file systems


def fit_name(stem: str, tail: str) -> str:
    """stem + tail, the stem shortened (with a hash of the full name, so two long names
    stay apart) until the name fits NAME_MAX bytes. Names are bytes: any the kernel
    allows, surrogate-escaped as os.fsdecode gives them."""
    name = stem + tail
    if len(os.fsencode(name)) <= NAME_MAX:
        return name
    tag = "~" + hashlib.sha1(os.fsencode(name)).hexdigest()[:10]
    while stem and len(os.fsencode(stem + tag + tail)) > NAME_MAX:
        stem = stem[:-1]
    return stem + tag + tail


def sidecar_path(path: Path) -> Path:
    """NAME.json beside a quarantined file; a hash-shortened name when NAME is too long."""
    return path.with_name(fit_name(path.name, SIDECAR_SUFFIX))


def partial_path(dst: Path, token: object) -> Path:
    """The temporary name of a cross-file-system copy: beside dst (same file system, so
    it can be renamed into place), a dotfile that watchers ignore."""
    return dst.with_name(f"{PARTIAL_PREFIX}{token}")


def _copy_preserving(src: Path, partial: Path) -> None:
    """Copy src's bytes, owner (when permitted), mode, times and xattrs; fsync."""
    st = os.lstat(src)
    shutil.copyfile(src, partial, follow_symlinks=False)
    with contextlib.suppress(PermissionError):  # unprivileged: the copy is ours
        os.chown(partial, st.st_uid, st.st_gid, follow_symlinks=False)
    shutil.copystat(src, partial, follow_symlinks=False)  # after chown (it clears setuid)
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_no_replace(src: Path, dst: Path, partial: Path) -> None:
    """Move src to dst without ever overwriting dst; raises FileExistsError if dst exists.

    Same file system: link then unlink (a crash in between leaves two names of one inode,
    which reconcile resolves). Across file systems: copy to `partial` (beside dst),
    fsync, link to dst, then unlink src. Any failure leaves src as it was and nothing
    at dst or partial (no orphan copy); the error is raised.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            _copy_across(src, dst, partial)
        elif exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            if os.path.lexists(dst):  # no hard links here: a plain rename, checked first
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            os.rename(src, dst)
            with contextlib.suppress(OSError):  # the move is done; durability best effort
                _fsync_dir(dst.parent)
            return
        else:
            raise
    try:
        _fsync_dir(dst.parent)
        os.unlink(src)
    except OSError:
        if os.path.lexists(src):  # src untouched: undo the new name, report the failure
            os.unlink(dst)
            raise
    with contextlib.suppress(OSError):  # src is gone, dst is durable: the move is done
        _fsync_dir(src.parent)


def _copy_across(src: Path, dst: Path, partial: Path) -> None:
    """src to dst on another file system, through `partial`. Until dst is linked, a
    failure removes `partial` and is raised; after, dst is complete and the move goes on
    even if `partial` cannot be removed (a second name of dst's inode, removed at the
    next start by `Quarantine.reconcile`): raising then would leave two copies."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        _copy_preserving(src, partial)
        os.link(partial, dst)  # no-replace, unlike rename
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    try:
        os.unlink(partial)
    except OSError as exc:
        log.warning("%s: moved, but its temporary name %s stays until the next start: %s",
                    dst, partial.name, exc.strerror or exc)


class Quarantine:
    """The quarantine directory plus its journal in the store.

    Over ~200 lines (and the module over ~400) on purpose: moving in, restoring, purging
    and the start-up repair are one protocol over one journal; each step's recovery is
    written beside the step it recovers, so that a change to one cannot forget the other.
    """

    def __init__(self, store: Store, directory: Path) -> None:
        self.store = store
        self.directory = Path(directory)
        self._unfinished: list[tuple[QuarantineEntry, ImageRecord | None]] = []
        self._unfinished_lock = threading.Lock()
        # Moves the last start-up repair completed (see reconcile).
        self.repaired: list[QuarantineEntry] = []

    # -- naming
    def target_for(self, original: Path, root: Path | None) -> Path:
        """quarantine_dir/<root without leading />/<relative path>, never outside the dir."""
        base = self.directory.resolve()
        if root is not None and (original == root or root in original.parents):
            rel = Path(str(root).lstrip("/")) / original.relative_to(root)
        else:
            rel = Path("_elsewhere") / original.name
        if any(part in ("", ".", "..") for part in rel.parts):
            raise QuarantineError(f"{original}: refusing a quarantine path with {rel}")
        target = base / rel
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        real_parent = Path(os.path.realpath(parent))
        if real_parent != base and base not in real_parent.parents:
            raise QuarantineError(f"{target}: escapes the quarantine directory {base}")
        return real_parent / target.name

    def _free_name(self, target: Path) -> Path:
        """target, or target with ~N before the suffix if taken (with its sidecar)."""
        stem, suffix = target.stem, target.suffix
        if len(suffix) > 16:  # "a.<long tail>": not an extension worth keeping
            stem, suffix = target.name, ""
        candidate, n = target, 0
        while os.path.lexists(candidate) or os.path.lexists(sidecar_path(candidate)):
            n += 1
            candidate = target.with_name(fit_name(f"{stem}~{n}", suffix))
        return candidate

    # -- moving in
    def move_in(self, original: Path, root: Path | None, *, record: ImageRecord,
                matched_path: str, distance: int, hash_hex: str, policy: str,
                reason: str = "duplicate", transform: str | None = None,
                low_information: bool = False) -> QuarantineEntry:
        """Quarantine `original`, whose record is `record` (stored already if it has an id).
        transform, low_information: how it matched (Match.transform), and whether its
        hash alone says little; kept in the journal entry."""
        for _attempt in range(100):
            try:
                target = self._free_name(self.target_for(original, root))
            except OSError as exc:  # its directory cannot be made (read-only, full, ...)
                raise QuarantineError(f"{original}: cannot move to quarantine: "
                                      f"{exc.strerror or exc}") from None
            entry = self.store.add_quarantine(QuarantineEntry(
                original_path=str(original), quarantine_path=str(target),
                matched_path=matched_path, distance=distance, hash=hash_hex, policy=policy,
                image_id=record.id, reason=reason, transform=transform,
                low_information=low_information))
            try:
                move_no_replace(original, target, partial_path(target, entry.id))
            except FileExistsError:  # lost a race for the name: journal it, try another
                self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
                continue
            except OSError as exc:
                leftovers = _leftovers(target, entry.id)
                if not leftovers:  # else pending: repaired at start
                    self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
                if isinstance(exc, FileNotFoundError) and not leftovers and \
                        os.path.lexists(original) and not os.path.lexists(target.parent):
                    continue  # a purge or restore pruned the directory target_for made
                raise QuarantineError(f"{original}: cannot move to quarantine: "
                                      f"{exc.strerror or exc}") from None
            try:
                return self._complete(entry, record)
            except StoreError:
                # The file is in quarantine already: its record and journal entry are
                # finished by finish_moves() once the store is back (or by reconcile()
                # at the next start). The caller sees the outage.
                with self._unfinished_lock:
                    self._unfinished.append((entry, record))
                raise
        raise QuarantineError(f"{original}: no free name in quarantine")  # pragma: no cover

    def _complete(self, entry: QuarantineEntry, record: ImageRecord | None) -> QuarantineEntry:
        """After the file is in quarantine: sidecar, record, journal DONE (all idempotent)."""
        target = Path(entry.quarantine_path)
        stored = self.store.get_by_path(str(target))
        if stored is None and entry.image_id is not None:
            stored = self.store.get(entry.image_id)
            if stored is not None:
                stored = stored.with_(path=str(target), status=QUARANTINED)
                try:
                    self.store.update(stored)
                except RecordGone:  # forgotten meanwhile (its old path vanished)
                    stored = None
        if stored is None and record is not None:
            stored = self.store.insert(record.with_(path=str(target), status=QUARANTINED,
                                                    id=None))
        done = replace(entry, state=DONE, image_id=stored.id if stored else entry.image_id)
        sidecar = {k: v for k, v in asdict(done).items() if k != "state"}
        sidecar["quarantined_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                  time.gmtime(done.created))
        # json escapes lone surrogates (\udcff): os.fsencode of the loaded string gives
        # back a name's exact bytes, whatever the kernel allowed.
        try:  # a convenience copy of the journal: its failure must not undo the move
            _write_atomic(sidecar_path(target), json.dumps(sidecar, indent=2) + "\n",
                          partial_path(target, f"sidecar-{entry.id}"))
        except OSError as exc:
            log.warning("%s: quarantined, but its sidecar cannot be written: %s", target, exc)
        self.store.update_quarantine(done)
        return done

    def finish_moves(self) -> list[QuarantineEntry]:
        """Finish moves whose bookkeeping the store refused mid-way (an outage); returns
        their entries. Raises StoreError while the store is still away (the rest wait)."""
        done = []
        with self._unfinished_lock:
            while self._unfinished:
                entry, record = self._unfinished[0]
                done.append(self._complete(entry, record))
                self._unfinished.pop(0)
        return done

    # -- start-up repair
    def reconcile(self, record_for: Callable[[QuarantineEntry], ImageRecord | None]
                  ) -> dict[str, int]:
        """Finish or undo every half-done move; `record_for` rehashes an entry's file.
        Never raises for one entry's file-system trouble: that entry is logged and left
        for the next start, the others are repaired. The moves it completed (a crash
        came before their report) are in self.repaired, for the caller to report."""
        counts = {"completed": 0, "rolled_back": 0, "restored": 0, "purged": 0, "failed": 0}
        self.repaired = []
        if self.directory.exists():
            for leftover in self.directory.glob(f"{PARTIAL_PREFIX}*"):
                leftover.unlink(missing_ok=True)  # our own partial copies; sources intact
        for entry in self.store.list_quarantine((PENDING, DONE, RESTORING, RESTORED)):
            try:
                outcome = self._repair(entry, record_for)
            except OSError as exc:
                log.error("quarantine entry %s (%s): cannot repair now, retried at the next "
                          "start: %s", entry.id, entry.quarantine_path, exc)
                outcome = "failed"
            if outcome:
                counts[outcome] += 1
        return counts

    def _repair(self, entry: QuarantineEntry,
                record_for: Callable[[QuarantineEntry], ImageRecord | None]) -> str | None:
        """Bring one journal entry to a final state; returns what was done, if anything."""
        src, dst = Path(entry.original_path), Path(entry.quarantine_path)
        # A copy a crash left beside its target, or the temporary name of a finished
        # cross-file-system move that could not be removed then (a second name of it).
        _drop_partials(entry)
        if entry.state in (PENDING, RESTORING):
            partial_path(dst, f"sidecar-{entry.id}").unlink(missing_ok=True)
        src_there, dst_there = os.path.lexists(src), os.path.lexists(dst)
        if entry.state == PENDING:
            # dst only ever appears complete (linked into place after fsync). If src now
            # holds other bytes, someone wrote a new file there: both stay.
            if src_there and dst_there and (os.path.samefile(src, dst)
                                            or _same_bytes(src, dst)):
                os.unlink(src)
            if dst_there:
                record = None if entry.image_id is not None else record_for(entry)
                self.repaired.append(self._complete(entry, record))
                return "completed"
            self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
            return "rolled_back"
        if entry.state == RESTORING:  # moving back out: finish if it got there, else undo
            if src_there and dst_there and (os.path.samefile(src, dst)
                                            or _same_bytes(src, dst)):
                os.unlink(dst)
                dst_there = False
            if src_there and not dst_there:
                self._restored(entry)
                return "restored"
            self._move_record(entry, frm=src, to=dst, status=QUARANTINED)
            self.store.update_quarantine(replace(entry, state=DONE))
            return "rolled_back"
        if entry.state == RESTORED:  # journalled by an older dedupd before its rename
            if src_there and dst_there and (os.path.samefile(src, dst)
                                            or _same_bytes(src, dst)):
                os.unlink(dst)  # back in place; the quarantine's name was left over
                _remove_sidecar(dst)
                return "restored"
            if dst_there and not src_there:
                move_no_replace(dst, src, partial_path(src, entry.id))
                _remove_sidecar(dst)
                return "restored"
            return None
        if not dst_there:  # DONE, but the file is gone: someone purged it by hand
            self._forget(entry)
            self._prune(dst.parent)
            return "purged"
        return None

    def _forget(self, entry: QuarantineEntry) -> None:
        rec = self.store.get_by_path(entry.quarantine_path)
        if rec is not None and rec.status == QUARANTINED:
            self.store.delete(rec.id)  # type: ignore[arg-type]
        self.store.update_quarantine(replace(entry, state=PURGED))

    # -- operator commands
    def find(self, target: str) -> QuarantineEntry:
        """An entry by id, quarantine path or original path (latest first)."""
        if target.isdigit():
            entry = self.store.get_quarantine(int(target))
            if entry is None:
                raise QuarantineError(f"no quarantine entry {target}")
            return entry
        path = os.path.abspath(target)
        for entry in reversed(self.store.list_quarantine((DONE,))):
            if path in (entry.quarantine_path, entry.original_path):
                return entry
        raise QuarantineError(f"{target}: not in quarantine")

    def restore(self, entry: QuarantineEntry) -> Path:
        """Move a quarantined file back and mark it allowed (never quarantined again).
        Journalled as `restoring` first; marked restored only once the file is back.
        If the move fails the file stays in quarantine, listed as before."""
        if entry.state != DONE:
            raise QuarantineError(f"entry {entry.id} is {entry.state}, not quarantined")
        src, dst = Path(entry.quarantine_path), Path(entry.original_path)
        if not src.exists():
            raise QuarantineError(f"{src}: quarantined file is missing")
        if os.path.lexists(dst):
            raise QuarantineError(f"{dst}: a file already exists there; move it first")
        dst.parent.mkdir(parents=True, exist_ok=True)
        restoring = replace(entry, state=RESTORING)
        self.store.update_quarantine(restoring)  # a crash after this: reconcile() decides
        # The record moves first, so a daemon watching the root sees a known, allowed file.
        self._move_record(entry, frm=src, to=dst, status=ALLOWED)
        try:
            move_no_replace(src, dst, partial_path(dst, entry.id))
        except OSError as exc:
            if not _leftovers(dst, entry.id):  # else `restoring`: repaired at start
                self._move_record(entry, frm=dst, to=src, status=QUARANTINED)
                self.store.update_quarantine(entry)
            raise QuarantineError(f"{dst}: cannot restore from {src}: "
                                  f"{exc.strerror or exc}") from None
        self._restored(restoring)
        with contextlib.suppress(OSError):  # a second name left by the move in, if any
            partial_path(src, entry.id).unlink(missing_ok=True)
        self._prune(src.parent)
        return dst

    def _move_record(self, entry: QuarantineEntry, *, frm: Path, to: Path,
                     status: str) -> None:
        rec = self.store.get_by_path(str(frm))
        if rec is None or entry.image_id not in (None, rec.id):
            return  # not this entry's record (another file took the path)
        if self.store.get_by_path(str(to)) is None:
            self.store.update(rec.with_(path=str(to), status=status))

    def _restored(self, entry: QuarantineEntry) -> None:
        """The file is back at its original path: the journal says so, the sidecar goes."""
        self._move_record(entry, frm=Path(entry.quarantine_path), to=Path(entry.original_path),
                          status=ALLOWED)
        try:
            _remove_sidecar(Path(entry.quarantine_path))
        except OSError as exc:
            log.warning("%s: restored, but its sidecar stays: %s", entry.original_path, exc)
        self.store.update_quarantine(replace(entry, state=RESTORED))

    def purge(self, older_than_days: float, dry_run: bool = False) -> list[QuarantineEntry]:
        """Delete quarantined files older than N days (the operator asked explicitly)."""
        cutoff = time.time() - older_than_days * 86400
        gone = [e for e in self.store.list_quarantine((DONE,)) if e.created < cutoff]
        if not dry_run:
            for entry in gone:
                self.purge_entry(entry)
        return gone

    def purge_entry(self, entry: QuarantineEntry) -> None:
        """Delete one quarantined file and its sidecar; the journal says purged."""
        if entry.state != DONE:
            raise QuarantineError(f"entry {entry.id} is {entry.state}, not quarantined")
        path = Path(entry.quarantine_path)
        path.unlink(missing_ok=True)
        _remove_sidecar(path)
        _drop_partials(entry)  # else a second name would keep the purged bytes
        self._forget(entry)
        self._prune(path.parent)

    def _prune(self, directory: Path) -> None:
        """Remove `directory` and its parents while empty, up to (not including) the
        quarantine directory: purged and restored files leave no empty tree behind.
        A move in racing with this makes its directory again (see move_in)."""
        base = Path(os.path.realpath(self.directory))
        directory = Path(os.path.realpath(directory))
        while base in directory.parents:
            try:
                os.rmdir(directory)
            except OSError:  # not empty (or not ours to remove): stop there
                return
            directory = directory.parent


def restore_and_report(q: Quarantine, entry: QuarantineEntry, *,
                       not_a_duplicate: bool = False) -> Path:
    """Restore an entry and log `restored`: the one way `dedupd restore` and the review
    page do it. not_a_duplicate also records, in the journal entry's reason, that the
    operator judged the match wrong."""
    from dedupd.events import Event, emit

    if not_a_duplicate:
        entry = replace(entry, reason=NOT_A_DUPLICATE)
    back = q.restore(entry)
    emit(Event.RESTORED, f"{back}: restored from quarantine and allowed"
         + (" (not a duplicate)" if not_a_duplicate else ""),
         path=str(back), quarantine_path=entry.quarantine_path, match=entry.matched_path,
         distance=entry.distance, policy=entry.policy,
         reason=NOT_A_DUPLICATE if not_a_duplicate else None)
    return back


def _leftovers(dst: Path, entry_id: int | None) -> bool:
    """After a failed move: did cleaning up fail too (a name at dst or its partial)?"""
    return os.path.lexists(dst) or os.path.lexists(partial_path(dst, entry_id))


def _drop_partials(entry: QuarantineEntry) -> None:
    """Remove the temporary names of an entry's moves (its id names them). In the
    quarantine directory, ours; beside the original path, a user's directory, only the
    copy of a restore in progress, or a second name of the restored file itself: never
    a user's own file that happens to be called so."""
    partial_path(Path(entry.quarantine_path), entry.id).unlink(missing_ok=True)
    beside = partial_path(Path(entry.original_path), entry.id)
    with contextlib.suppress(FileNotFoundError):
        if entry.state == RESTORING or os.path.samefile(beside, entry.original_path):
            beside.unlink()


def _remove_sidecar(path: Path) -> None:
    sidecar_path(path).unlink(missing_ok=True)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True
