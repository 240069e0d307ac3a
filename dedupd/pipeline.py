"""The one path of a file: admit (selection) → hash → look up → decide → act → report.

The daemon feeds it files from its queue (`Pipeline.process`); `dedupd scan` hashes on
all cores first and hands each hash in (`Pipeline.admit`, then `Pipeline.ingest`), so a
scan applies exactly the daemon's rules. Which files are ours is dedupd.selection's
answer, what a hash duplicates dedupd.matching's, the verdict dedupd.policy's, and the
acting and reporting (duplicates and bad input alike) dedupd.act's. What only the
daemon knows (whether a file is still being written, arrival order in its queue) comes
in through the Intake it passes.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from dedupd.act import Actor, Outcome
from dedupd.config import Config, Policy, Watch
from dedupd.events import Event, emit
from dedupd.hashing import ImageError, ImageHash, hash_file
from dedupd.imagefile import file_kind
from dedupd.matching import (
    CANDIDATES,
    as_flipped,
    find_duplicates,
    lookup_radius,
    second_look,
)
from dedupd.policy import ACCEPT, DUPLICATE, Breaker, Decision, big_enough, decide
from dedupd.selection import Selected, select, symlink_allowed, symlink_reason
from dedupd.store import ImageRecord, Match, QuarantineEntry, Store
from dedupd.store.base import UNRESOLVED, Lookup, nearest_first

__all__ = ["Admitted", "Intake", "Outcome", "Pipeline", "find_duplicates", "record_for"]

log = logging.getLogger("dedupd.pipeline")
# What a file still being written looks like: decided only once provably finished.
MAYBE_UNFINISHED = ("empty", "truncated", "corrupt", "unsupported")


def record_for(hashed: ImageHash, scope: str, path: Path | str, mtime_ns: int,
               first_seen: float | None = None) -> ImageRecord:
    """The dictionary's record of a hashed file (not yet stored: no id)."""
    return ImageRecord(scope=scope, path=str(path), recipe=hashed.recipe.key,
                       hash=hashed.hash, digest=hashed.digest, file_size=hashed.file_size,
                       mtime_ns=mtime_ns, width=hashed.width, height=hashed.height,
                       signature=hashed.signature.to_bytes() if hashed.signature else None,
                       **({"first_seen": first_seen} if first_seen is not None else {}))


class Intake(Protocol):
    """What the path needs from whoever feeds it files (the daemon's queue and timers)."""

    def unreadable(self, directory: Path, exc: OSError) -> None:
        """A file's directory cannot be searched: say so (once)."""

    def changed(self, path: Path, before: os.stat_result) -> bool:
        """Changed since `before` (still being written)? Then the intake looks again."""

    def unfinished(self, path: Path, st: os.stat_result) -> bool:
        """A short or broken file not provably finished: True if the intake looks at it
        again later; False to judge it now."""

    def hashed(self, seconds: float) -> None:
        """How long hashing one file took (metrics)."""

    def turn(self, path: Path) -> tuple[float | None, float | None]:
        """Wait until files that arrived earlier are decided; (arrival, queued since)."""


@dataclass(frozen=True)
class Admitted:
    """A file that is ours and a regular file (or a symlink we follow), as stat saw it."""

    selected: Selected
    st: os.stat_result


class Pipeline:
    """The path of one file, with per-root circuit breakers; acting is self.actor's.

    A little over 200 lines on purpose: the steps of the one path (admit, hash, look
    up, decide) read top to bottom in one class; acting and reporting are dedupd.act's,
    matching dedupd.matching's."""

    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.actor = Actor(config, store)
        self.quarantine = self.actor.quarantine
        self.counts = self.actor.counts
        # How long an open circuit breaker stays open, for its message (`scan` says its own).
        self.breaker_until = "the config is reloaded or the daemon restarts"
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)load the rules; a reload re-arms every circuit breaker."""
        self.config = config
        self.breakers = {w.path: Breaker(config.circuit_breaker) for w in config.watches}
        self.actor.configure(config)

    # ------------------------------------------------------------ admit and hash

    def admit(self, path: Path, intake: Intake | None = None) -> Admitted | None:
        """Is this a file of ours to hash? Symlinks (unless followed) and FIFOs, sockets
        and devices are rejected (said once); directories and vanished files are not
        files to judge."""
        selected = select(self.config, path)
        if selected is None:
            return None
        try:
            st = path.lstat()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. a directory without search permission
            if intake is not None:
                intake.unreadable(path.parent, exc)
            return None
        if stat.S_ISLNK(st.st_mode):
            if not symlink_allowed(self.config, path):
                self.reject(path, selected.watch, ImageError(
                    "not_regular", symlink_reason(self.config, path)), st, intake)
                return None
            try:
                st = path.stat()
            except OSError:  # the target went away meanwhile
                return None
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):  # a FIFO, socket or device: said once
                self.reject(path, selected.watch, ImageError(
                    "not_regular", f"{file_kind(st.st_mode)}, not a regular file"), st,
                    intake)
            return None
        return Admitted(selected, st)

    def unchanged(self, known: ImageRecord | None, st: os.stat_result) -> bool:
        """Decided already, as the file is now (an unresolved one is decided again, and
        one hashed with another recipe re-hashed, e.g. v1 -> v2)?"""
        return known is not None and known.status != UNRESOLVED and \
            (known.file_size, known.mtime_ns) == (st.st_size, st.st_mtime_ns) and \
            known.recipe == self.config.recipe.key

    def process(self, path: Path, intake: Intake) -> Outcome | None:
        """The whole path of one file the daemon's queue hands out."""
        admitted = self.admit(path, intake)
        if admitted is None:
            return None
        watch, st = admitted.selected.watch, admitted.st
        known, rejected = self.store.path_state(str(path))
        if self.unchanged(known, st):
            self.actor.report_interrupted(path)  # decided just before an outage
            return None
        started = time.monotonic()
        try:
            hashed = hash_file(path, self.config.recipe, self.config.max_pixels)
        except ImageError as exc:
            if not intake.changed(path, st):
                self.reject(path, watch, exc, st, intake)
            return None
        if hashed.warnings:  # decoded all the same: accepted or matched, complaint logged
            log.warning("%s: decoded with complaints (hashed anyway): %s", path,
                        "; ".join(hashed.warnings))
        intake.hashed(time.monotonic() - started)
        if intake.changed(path, st):
            return None
        if known is None and rejected:
            self.store.forget_rejection(str(path))  # it was fixed (rewritten)
        arrival, queued = intake.turn(path)
        return self.ingest(path, watch, hashed, st.st_mtime_ns, known, arrival=arrival,
                           queued=queued)

    def reject(self, path: Path, watch: Watch, exc: ImageError, st: os.stat_result,
               intake: Intake | None = None) -> None:
        """Bad input, said once until the file changes; a file that may still be being
        written is judged only once the intake says it is finished."""
        if exc.kind == "vanished" or self.actor.known_reject(path, st):
            return
        if exc.kind in MAYBE_UNFINISHED and intake is not None and \
                intake.unfinished(path, st):
            return
        self.actor.reject(path, watch, exc, st)

    def rehash_entry(self, entry: QuarantineEntry) -> ImageRecord | None:
        """Rebuild the record of a file a crash left in quarantine without one."""
        dst = Path(entry.quarantine_path)
        watch = self.config.watch_for(entry.original_path)
        try:
            hashed = hash_file(dst, self.config.recipe, self.config.max_pixels)
            mtime_ns = dst.stat().st_mtime_ns
        except (ImageError, OSError):
            return None
        return record_for(hashed, watch.scope if watch else str(dst.parent), dst, mtime_ns)

    # ------------------------------------------------------------ look up, decide, act

    def ingest(self, path: Path, watch: Watch, hashed: ImageHash, mtime_ns: int,
               known: ImageRecord | None, *, arrival: float | None = None,
               queued: float | None = None) -> Outcome | None:
        """Look up, decide, act. `known` is the record the path already had (the file
        was rewritten in place). `arrival` (wall-clock time of the file's first event, or
        its mtime when a scan found it) and `queued` (time.monotonic() from when it
        waited) make `keep: first` mean arrival order, whichever copy hashed first.
        None when nothing was decided: the file vanished, is below the policy's
        minimum size, or is an indexed file that moved."""
        self.actor.count("processed")
        policy = self.config.policy_for(watch)
        if not big_enough(policy, hashed.width, hashed.height):
            log.debug("%s: %dx%d is below the policy's minimum size; ignored",
                      path, hashed.width, hashed.height)
            return None
        record = record_for(hashed, watch.scope, path, mtime_ns, first_seen=arrival)
        if known is None:
            # The usual case takes no lock: look (a shared store may answer from a copy
            # that lags), decide, and let store.claim() confirm a keep (see _settle).
            if not path.exists():
                return None
            matches, seen = self._look(record, hashed, policy)
            if not self._gone(matches):
                return self._decide_and_act(path, watch, record, matches[:8], seen, hashed,
                                            queued)
        # Rewritten in place, or a match vanished (perhaps this very file, moved): under
        # the scope's lock, so the record is updated or moved exactly once.
        with self.store.locked(watch.scope):
            if not path.exists():
                return None
            if known is not None:  # rewritten in place: same record, new content
                record = record.with_(id=known.id, first_seen=known.first_seen,
                                      status=known.status)
                self.store.update(record)
            matches = find_duplicates(self.store, watch.scope, hashed, policy.max_distance,
                                      flips=policy.match_flips_rotations, exclude=record.path)
            gone = self._gone(matches)
            if known is None:
                moved = next((m for m in gone if m.identical), None)
                if moved is not None:  # moved while nobody was watching
                    self.store.update(moved.record.with_(path=record.path,
                                                         mtime_ns=record.mtime_ns))
                    return None
            matches = [m for m in matches if m not in gone]
            return self._decide_and_act(path, watch, record, matches, Lookup(matches), hashed,
                                        queued)

    def _look(self, record: ImageRecord, hashed: ImageHash, policy: Policy
              ) -> tuple[list[Match], Lookup]:
        """(duplicates, everything seen) without a lock. `seen` keeps every candidate
        (claim() must not report them as new); the decision sees those the second look
        confirms, and with flips on, as a mirror image or rotation."""
        seen = self.store.lookup(record.scope, record.recipe, record.hash, record.digest,
                                 lookup_radius(hashed.signature, policy.max_distance),
                                 limit=CANDIDATES)
        matches = second_look(self.store, hashed.signature,
                              [m for m in seen.matches if m.record.path != record.path],
                              policy.max_distance)
        if policy.match_flips_rotations and not matches:
            matches = as_flipped(self.store, record.scope, hashed, policy.max_distance,
                                 record.path)
        return matches, seen

    def _arrived_first(self, record: ImageRecord, matches: list[Match],
                       queued: float | None) -> bool:
        """Did the newcomer arrive before its nearest match, which was decided only
        while the newcomer waited (it hashed faster)? Ties go by path: deterministic."""
        if not matches or queued is None:
            return False
        best = matches[0].record
        decided = self.actor.decided_at(best.path)
        return (decided is not None and decided >= queued
                and (record.first_seen, record.path) < (best.first_seen, best.path))

    def _gone(self, matches: list[Match]) -> list[Match]:
        """Matches whose files vanished from under our roots. The disk is the truth only
        there: a shared dictionary holds other hosts' records, whose paths we cannot see."""
        return [m for m in matches if self.config.watch_for(m.record.path) is not None
                and not os.path.lexists(m.record.path)]

    def _settle(self, path: Path, watch: Watch, record: ImageRecord, matches: list[Match],
                seen: Lookup, breaker_open: bool, hashed: ImageHash,
                queued: float | None = None) -> Decision:
        """The decision, with a newcomer that is to be kept already claimed in the store:
        a look-alike that arrived meanwhile (here or on another host) makes the claim
        fail and is decided against instead. The accept report is held from before the
        claim (see Actor.keep)."""
        policy = self.config.policy_for(watch)
        while True:
            decision = decide(policy, record, matches, breaker_open=breaker_open,
                              newcomer_first=self._arrived_first(record, matches, queued))
            if decision.verdict == DUPLICATE or record.id is not None:
                return decision
            if decision.verdict == ACCEPT:
                self.actor.hold(record.path, self.actor.accepted(path, watch, record, hashed))
            newer = self.store.claim(
                record, lookup_radius(hashed.signature, policy.max_distance), seen)
            if not newer:
                return decision
            self.actor.hold(record.path, None)
            # Candidates that arrived meanwhile get the second look too; all of them are
            # "seen" for the next claim.
            matches = nearest_first([*matches, *second_look(
                self.store, hashed.signature, newer, policy.max_distance)], 8)
            seen = Lookup(nearest_first([*seen.matches, *newer], len(seen.matches) + 8),
                          seen.horizon)

    def _decide_and_act(self, path: Path, watch: Watch, record: ImageRecord,
                        matches: list[Match], seen: Lookup, hashed: ImageHash,
                        queued: float | None = None) -> Outcome:
        policy = self.config.policy_for(watch)
        breaker = self.breakers.setdefault(watch.path, Breaker(self.config.circuit_breaker))
        decision = self._settle(path, watch, record, matches, seen, breaker.open, hashed,
                                queued)
        claimed = record.id is None and decision.verdict != DUPLICATE
        removes = decision.verdict != ACCEPT and decision.action in ("quarantine", "delete")
        if breaker.record(removes):
            emit(Event.CIRCUIT_OPEN, f"{watch.path}: {breaker.share:.0%} of the last "
                 f"{breaker.decisions} decisions would remove files; this root is now "
                 f"log-only until {self.breaker_until}. Check max_distance!",
                 root=str(watch.path), policy=policy.name)
            decision = replace(decision, action="log")
        return self.actor.act(decision, path, watch, record, hashed, claimed=claimed)
