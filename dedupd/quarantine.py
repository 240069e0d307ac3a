"""Crash-safe moves into and out of the quarantine directory.

Protocol (never lose an image): the intent is journalled in the store before any rename;
the move itself is link+unlink (no-replace, atomic on one file system) or, across file
systems, copy + fsync + rename + unlink; `reconcile()` on start finishes or rolls back
whatever a crash left half-done. Every file ends either at its origin or in quarantine.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
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
    ROLLED_BACK,
    ImageRecord,
    QuarantineEntry,
    Store,
    StoreError,
)

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{PARTIAL_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def move_no_replace(src: Path, dst: Path, partial: Path) -> None:
    """Move src to dst without ever overwriting dst; raises FileExistsError if dst exists.

    Same file system: link then unlink (a crash in between leaves two names of one inode,
    which reconcile resolves). Across file systems: copy to `partial`, fsync, rename to
    dst, then unlink src.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            if dst.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            shutil.copyfile(src, partial, follow_symlinks=False)
            shutil.copystat(src, partial, follow_symlinks=False)
            with open(partial, "rb+") as fh:
                os.fsync(fh.fileno())
            os.rename(partial, dst)
        elif exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            if dst.exists():  # no hard links here: a plain rename, checked first
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            os.rename(src, dst)
            _fsync_dir(dst.parent)
            return
        else:
            raise
    _fsync_dir(dst.parent)
    os.unlink(src)
    _fsync_dir(src.parent)


class Quarantine:
    """The quarantine directory plus its journal in the store."""

    def __init__(self, store: Store, directory: Path) -> None:
        self.store = store
        self.directory = Path(directory)
        self._unfinished: list[tuple[QuarantineEntry, ImageRecord | None]] = []
        self._unfinished_lock = threading.Lock()

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
        candidate, n = target, 0
        while candidate.exists() or candidate.with_name(candidate.name + SIDECAR_SUFFIX).exists():
            n += 1
            candidate = target.with_name(f"{target.stem}~{n}{target.suffix}")
        return candidate

    def _partial(self, entry_id: int | None) -> Path:
        return self.directory.resolve() / f"{PARTIAL_PREFIX}{entry_id}"

    # -- moving in
    def move_in(self, original: Path, root: Path | None, *, record: ImageRecord,
                matched_path: str, distance: int, hash_hex: str, policy: str,
                reason: str = "duplicate") -> QuarantineEntry:
        """Quarantine `original`, whose record is `record` (stored already if it has an id)."""
        for _attempt in range(100):
            target = self._free_name(self.target_for(original, root))
            entry = self.store.add_quarantine(QuarantineEntry(
                original_path=str(original), quarantine_path=str(target),
                matched_path=matched_path, distance=distance, hash=hash_hex, policy=policy,
                image_id=record.id, reason=reason))
            try:
                move_no_replace(original, target, self._partial(entry.id))
            except FileExistsError:  # lost a race for the name: journal it, try another
                self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
                continue
            except OSError as exc:
                self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
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
                self.store.update(stored)
        if stored is None and record is not None:
            stored = self.store.insert(record.with_(path=str(target), status=QUARANTINED,
                                                    id=None))
        done = replace(entry, state=DONE, image_id=stored.id if stored else entry.image_id)
        sidecar = {k: v for k, v in asdict(done).items() if k != "state"}
        sidecar["quarantined_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                  time.gmtime(done.created))
        _write_atomic(target.with_name(target.name + SIDECAR_SUFFIX),
                      json.dumps(sidecar, indent=2) + "\n")
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
        """Finish or undo every half-done move; `record_for` rehashes an entry's file."""
        counts = {"completed": 0, "rolled_back": 0, "restored": 0, "purged": 0}
        if self.directory.exists():
            for leftover in self.directory.glob(f"{PARTIAL_PREFIX}*"):
                leftover.unlink(missing_ok=True)  # our own partial copies; sources intact
        for entry in self.store.list_quarantine((PENDING, DONE, RESTORED)):
            src, dst = Path(entry.original_path), Path(entry.quarantine_path)
            src_there, dst_there = src.exists(), dst.exists()
            if entry.state == PENDING:
                if src_there and dst_there:
                    if os.path.samefile(src, dst) or _same_bytes(src, dst):
                        os.unlink(src)
                        src_there = False
                    else:
                        os.unlink(dst)
                        dst_there = False
                if dst_there:
                    record = None if entry.image_id is not None else record_for(entry)
                    self._complete(entry, record)
                    counts["completed"] += 1
                else:
                    self.store.update_quarantine(replace(entry, state=ROLLED_BACK))
                    counts["rolled_back"] += 1
            elif entry.state == RESTORED:
                if dst_there and not src_there:  # crash between journal and rename
                    move_no_replace(dst, src, self._partial(entry.id))
                    _remove_sidecar(dst)
                    counts["restored"] += 1
            elif not dst_there:  # DONE, but the file is gone: someone purged it by hand
                self._forget(entry)
                counts["purged"] += 1
        return counts

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
        """Move a quarantined file back and mark it allowed (never quarantined again)."""
        if entry.state != DONE:
            raise QuarantineError(f"entry {entry.id} is {entry.state}, not quarantined")
        src, dst = Path(entry.quarantine_path), Path(entry.original_path)
        if not src.exists():
            raise QuarantineError(f"{src}: quarantined file is missing")
        if dst.exists():
            raise QuarantineError(f"{dst}: a file already exists there; move it first")
        dst.parent.mkdir(parents=True, exist_ok=True)
        rec = self.store.get_by_path(str(src))
        # Journal first: a crash after this is finished by reconcile().
        if rec is not None:
            self.store.update(rec.with_(path=str(dst), status=ALLOWED))
        self.store.update_quarantine(replace(entry, state=RESTORED))
        move_no_replace(src, dst, self._partial(entry.id))
        _remove_sidecar(src)
        return dst

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
        self._forget(entry)


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


def _remove_sidecar(path: Path) -> None:
    path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)


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


# ---------------------------------------------------------------- CLI commands


def _entry_json(e: QuarantineEntry) -> dict[str, object]:
    return asdict(e)


def cmd_quarantine(args: argparse.Namespace, config: object) -> int:
    from dedupd.store import open_store

    store = open_store(config.index)  # type: ignore[attr-defined]
    try:
        q = Quarantine(store, config.quarantine_dir)  # type: ignore[attr-defined]
        if args.quarantine_command == "list":
            entries = store.list_quarantine((DONE,))
            if args.json:
                json.dump([_entry_json(e) for e in entries], sys.stdout)
                sys.stdout.write("\n")
            else:
                for e in entries:
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
                    print(f"{e.id:>6}  {when}  d={e.distance:<2}  {e.original_path}\n"
                          f"        -> {e.quarantine_path}  (duplicate of {e.matched_path})")
                print(f"{len(entries)} quarantined", file=sys.stderr)
            return 0
        gone = q.purge(args.older_than, dry_run=args.dry_run)
        if args.json:
            json.dump({"purged": [_entry_json(e) for e in gone], "dry_run": args.dry_run},
                      sys.stdout)
            sys.stdout.write("\n")
        else:
            for e in gone:
                print(e.quarantine_path)
            verb = "would purge" if args.dry_run else "purged"
            print(f"{verb} {len(gone)} files", file=sys.stderr)
        return 0
    finally:
        store.close()


def cmd_restore(args: argparse.Namespace, config: object) -> int:
    from dedupd.store import open_store

    store = open_store(config.index)  # type: ignore[attr-defined]
    try:
        q = Quarantine(store, config.quarantine_dir)  # type: ignore[attr-defined]
        from dedupd.events import setup_logging

        # A restore belongs in the service's log even when run from a shell: to journald
        # when the machine has one (`journalctl -t dedupd` shows it beside the service's).
        journald = os.path.exists("/run/systemd/journal/socket")
        setup_logging(args.log or ("journald" if journald else "auto"), "info")
        try:
            entry = q.find(args.target)
            back = restore_and_report(q, entry)
        except (QuarantineError, OSError, StoreError) as exc:
            print(f"dedupd: {exc}", file=sys.stderr)
            return 2
        if args.json:
            json.dump({"id": entry.id, "restored": str(back)}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(f"restored {back}")
        return 0
    finally:
        store.close()
