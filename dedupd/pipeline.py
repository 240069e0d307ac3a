"""What happens to one hashed image: compare it with the dictionary, decide by its root's
policy, act (keep, quarantine, delete, or only log) and say so in an event.

Shared by the daemon and `dedupd scan`, so a scan applies exactly the daemon's rules.
Hashing and watching happen before; this module only sees a hash and a path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from dedupd.config import Config, Watch
from dedupd.events import Event, emit
from dedupd.hashing import ImageHash, hash_to_hex
from dedupd.policy import ACCEPT, DUPLICATE, REPLACE, Breaker, Decision, big_enough, decide
from dedupd.quarantine import Quarantine, QuarantineError
from dedupd.signature import Signature, confirms
from dedupd.store import ImageRecord, Match, QuarantineEntry, Store
from dedupd.store.base import KEPT, LIVE_STATUSES, UNRESOLVED, Lookup, nearest_first

log = logging.getLogger("dedupd.pipeline")
# How many recent decisions keep: first remembers: a file still in the queue competes by
# arrival only with copies decided while it waited (bounded by the queue and workers).
DECIDED_MEMORY = 50_000

# Candidates within the threshold given a second look, nearest first: enough that a
# dictionary with many look-alikes (dark frames, blank pages) still finds the real copy.
CANDIDATES = 32


def second_look(store: Store, sig: Signature | None, matches: list[Match],
                max_distance: int) -> list[Match]:
    """The candidates that are duplicates: byte-identical copies at once, the others only
    when their stored signature confirms the newcomer's. A record stored before
    signatures existed matches on its hash alone, unless the newcomer's hash says little
    (low_information)."""
    near = [m.record.id for m in matches if not m.identical and m.record.id is not None]
    stored = store.signatures(near) if near and sig is not None else {}  # type: ignore[arg-type]
    kept = []
    for m in matches:
        if m.identical or sig is None:
            kept.append(m)
            continue
        other = Signature.from_bytes(stored.get(m.record.id, b""))  # type: ignore[arg-type]
        if (confirms(sig, other, max_distance) if other is not None
                else not sig.low_information):
            kept.append(m)
    return kept


def as_flipped(store: Store, scope: str, hashed: ImageHash, max_distance: int,
               exclude: str | None = None) -> list[Match]:
    """The records `hashed` duplicates as one of its 7 mirror images and rotations, for
    the first that has any (Match.transform names how the newcomer differs)."""
    for transform, value, sig in hashed.variants():
        found = [m for m in store.find_matches(scope, hashed.recipe.key, value, None,
                                               max_distance, limit=CANDIDATES)
                 if m.record.path != exclude]
        found = second_look(store, sig, found, max_distance)
        if found:
            return [replace(m, transform=transform) for m in found]
    return []


def find_duplicates(store: Store, scope: str, hashed: ImageHash, max_distance: int, *,
                    flips: bool = False, exclude: str | None = None, limit: int = 8
                    ) -> list[Match]:
    """The records `hashed` duplicates, nearest first: candidates within max_distance
    given the second look; with `flips`, when the image itself matches nothing, also as
    its mirror images and rotations."""
    found = [m for m in store.find_matches(scope, hashed.recipe.key, hashed.hash,
                                           hashed.digest, max_distance, limit=CANDIDATES)
             if m.record.path != exclude]
    found = second_look(store, hashed.signature, found, max_distance)
    if flips and not found:
        found = as_flipped(store, scope, hashed, max_distance, exclude)
    return found[:limit]


@dataclass(frozen=True)
class Outcome:
    """What ingest did with one image, for callers that report (scan)."""

    accepted: bool
    action: str | None = None  # quarantine, delete or log, for a duplicate
    match: Match | None = None  # the copy it duplicates (or that it replaced)
    loser: str | None = None  # the path acted on: the newcomer, or the older copy
    moved_to: str | None = None  # where quarantine put the loser


class Pipeline:
    """Decide-and-act for one root's images, with per-root circuit breakers and counts."""

    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.quarantine = Quarantine(store, config.quarantine_dir)
        self.counts = {"processed": 0, "accepted": 0, "duplicates": 0, "quarantined": 0,
                       "rejected": 0}
        self._counts_lock = threading.Lock()
        # Decisions whose store write failed mid-way: reported once a retry knows.
        self._unreported: dict[str, tuple[Event, str, dict[str, object]]] = {}
        # When each recently kept path was decided (time.monotonic()), for keep: first.
        self._decided: OrderedDict[str, float] = OrderedDict()
        # How long an open circuit breaker stays open, for its message (`scan` says its own).
        self.breaker_until = "the config is reloaded or the daemon restarts"
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)load the rules; a reload re-arms every circuit breaker."""
        self.config = config
        self.breakers = {w.path: Breaker(config.circuit_breaker) for w in config.watches}
        self.quarantine.directory = config.quarantine_dir

    def count(self, key: str) -> None:
        with self._counts_lock:
            self.counts[key] += 1

    def report_interrupted(self, path: Path) -> None:
        """The store already holds path's record: if its write was cut off by an outage
        before the decision was logged, log it now (exactly once)."""
        report = self._unreported.pop(str(path), None)
        if report is not None:
            emit(report[0], report[1], **report[2])  # type: ignore[arg-type]

    def ingest(self, path: Path, watch: Watch, hashed: ImageHash, mtime_ns: int,
               known: ImageRecord | None, *, arrival: float | None = None,
               queued: float | None = None) -> Outcome | None:
        """Compare, decide, act. `known` is the record the path already had (the file
        was rewritten in place). `arrival` (wall-clock time of the file's first event, or
        its mtime when a scan found it) and `queued` (time.monotonic() from when it
        waited) make `keep: first` mean arrival order, whichever copy hashed first.
        None when nothing was decided: the file vanished, is below the policy's
        minimum size, or is an indexed file that moved."""
        self.count("processed")
        policy = self.config.policy_for(watch)
        if not big_enough(policy, hashed.width, hashed.height):
            log.debug("%s: %dx%d is below the policy's minimum size; ignored",
                      path, hashed.width, hashed.height)
            return None
        record = ImageRecord(scope=watch.scope, path=str(path), recipe=hashed.recipe.key,
                             hash=hashed.hash, digest=hashed.digest,
                             file_size=hashed.file_size, mtime_ns=mtime_ns,
                             width=hashed.width, height=hashed.height,
                             signature=hashed.signature.to_bytes() if hashed.signature else None,
                             **({"first_seen": arrival} if arrival is not None else {}))
        flips = policy.match_flips_rotations
        if known is None:
            # The usual case takes no lock: look (a shared store may answer from a copy
            # that lags), decide, and let store.claim() confirm a keep (see _settle).
            if not path.exists():
                return None
            # `seen` keeps every candidate (claim() must not report them as new); the
            # decision sees those the second look confirms.
            seen = self.store.lookup(watch.scope, record.recipe, record.hash, record.digest,
                                     policy.max_distance, limit=CANDIDATES)
            matches = second_look(self.store, hashed.signature,
                                  [m for m in seen.matches if m.record.path != record.path],
                                  policy.max_distance)
            if flips and not matches:
                matches = as_flipped(self.store, watch.scope, hashed, policy.max_distance,
                                     record.path)
            if not self._gone(matches):
                return self._decide_and_act(path, watch, record, matches[:8], seen, hashed,
                                            queued)
        with self.store.locked(watch.scope):
            if not path.exists():
                return None
            if known is not None:  # rewritten in place: same record, new content
                record = record.with_(id=known.id, first_seen=known.first_seen,
                                      status=known.status)
                self.store.update(record)
            matches = find_duplicates(self.store, watch.scope, hashed, policy.max_distance,
                                      flips=flips, exclude=record.path)
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

    def _arrived_first(self, record: ImageRecord, matches: list[Match],
                       queued: float | None) -> bool:
        """Did the newcomer arrive before its nearest match, which was decided only
        while the newcomer waited (it hashed faster)? Ties go by path: deterministic."""
        if not matches or queued is None:
            return False
        best = matches[0].record
        with self._counts_lock:
            decided = self._decided.get(best.path)
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
        fail and is decided against instead. The accept report waits in _unreported from
        before the claim (see _keep)."""
        policy = self.config.policy_for(watch)
        while True:
            decision = decide(policy, record, matches, breaker_open=breaker_open,
                              newcomer_first=self._arrived_first(record, matches, queued))
            if decision.verdict == DUPLICATE or record.id is not None:
                return decision
            if decision.verdict == ACCEPT:
                self._unreported[record.path] = self._accepted(path, watch, record, hashed)
            newer = self.store.claim(record, policy.max_distance, seen)
            if not newer:
                return decision
            self._unreported.pop(record.path, None)
            # Candidates that arrived meanwhile get the second look too; all of them are
            # "seen" for the next claim.
            matches = nearest_first([*matches, *second_look(
                self.store, hashed.signature, newer, policy.max_distance)], 8)
            seen = Lookup(nearest_first([*seen.matches, *newer], len(seen.matches) + 8),
                          seen.horizon)

    def _accepted(self, path: Path, watch: Watch, record: ImageRecord, hashed: ImageHash
                  ) -> tuple[Event, str, dict[str, object]]:
        return (Event.IMAGE_ACCEPTED, f"{path}: accepted", dict(
            path=str(path), hash=hash_to_hex(record.hash, self.config.recipe.size),
            root=str(watch.path), policy=self.config.policy_for(watch).name,
            low_information=hashed.low_information or None))

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
        size = self.config.recipe.size
        if decision.verdict == ACCEPT:
            self._keep(record, self._accepted(path, watch, record, hashed), claimed=claimed)
            self.count("accepted")
            return Outcome(accepted=True)
        match = decision.match
        assert match is not None
        self.count("duplicates")
        if decision.verdict == REPLACE:  # the newcomer is larger, or came first
            loser, winner = match.record, record
            self._keep(winner, claimed=claimed)
        else:
            loser, winner = record, match.record
        outcome = Outcome(accepted=decision.verdict == REPLACE, action=decision.action,
                          match=match, loser=loser.path)
        # How the two differ, for people and scripts: a flip or rotation, and whether the
        # newcomer's hash alone said little (the signature or the digest decided).
        extra = dict(transform=match.transform,
                     low_information=hashed.low_information or None)
        fields = dict(path=loser.path, match=winner.path, distance=match.distance,
                      hash=hash_to_hex(loser.hash, size), policy=policy.name,
                      root=str(watch.path), action=decision.action, identical=match.identical,
                      **extra)
        what = f"{loser.path}: duplicate of {winner.path} (distance {match.distance})"
        if decision.action == "log" and policy.action == "log":
            self._keep(loser, (Event.DUPLICATE_LOGGED, f"{what}; left in place (log only)",
                               fields))
        elif decision.action == "log":  # the breaker holds back a removal: not settled
            self._keep(loser, (Event.DUPLICATE_LOGGED, f"{what}; left in place, unresolved "
                               "(circuit breaker open: log-only until a reload)", fields),
                       status=UNRESOLVED)
        elif decision.action == "delete":
            try:
                os.unlink(loser.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                return self._unresolved(loser, watch, f"cannot delete: {exc.strerror or exc}",
                                        outcome)
            if loser.id is not None:
                self.store.delete(loser.id)
            emit(Event.DUPLICATE_DELETED, f"{what}; deleted", **fields)
        else:
            loser_watch = self.config.watch_for(loser.path)
            try:
                entry = self.quarantine.move_in(
                    Path(loser.path), loser_watch.path if loser_watch else None, record=loser,
                    matched_path=winner.path, distance=match.distance,
                    hash_hex=fields["hash"], policy=policy.name)  # type: ignore[arg-type]
            except QuarantineError as exc:
                return self._unresolved(loser, watch, str(exc), outcome)
            self.report_quarantined(entry, root=str(watch.path), identical=match.identical,
                                    **extra)
            outcome = replace(outcome, moved_to=entry.quarantine_path)
        return outcome

    def _unresolved(self, loser: ImageRecord, watch: Watch, why: str,
                    outcome: Outcome) -> Outcome:
        """A removal the policy wants failed: the file stays, recorded as unresolved (not
        kept), and is decided again at the next reconciliation, reload or start."""
        self._keep(loser, (Event.IMAGE_REJECTED, f"{loser.path}: duplicate, but {why}; left "
                           "in place, unresolved (retried at the next rescan)", dict(
                               path=loser.path, reason=why, kind="quarantine_failed",
                               root=str(watch.path))), status=UNRESOLVED)
        return replace(outcome, action="log")

    def report_quarantined(self, entry: QuarantineEntry, **fields: object) -> None:
        """Count and log a finished quarantine move: one just made, or one an outage
        interrupted and Quarantine.finish_moves() completed later."""
        self.count("quarantined")
        emit(Event.DUPLICATE_QUARANTINED, f"{entry.original_path}: duplicate of "
             f"{entry.matched_path} (distance {entry.distance}); moved to "
             f"{entry.quarantine_path}", path=entry.original_path, match=entry.matched_path,
             distance=entry.distance, hash=entry.hash, policy=entry.policy,
             action="quarantine", quarantine_path=entry.quarantine_path, **fields)

    def _keep(self, record: ImageRecord,
              report: tuple[Event, str, dict[str, object]] | None = None,
              claimed: bool = False, status: str = KEPT) -> None:
        """Record a file as part of its dataset (unless `claimed` did), or as an
        unresolved duplicate, then emit `report`. If the store fails mid-write the report
        waits: the retry finds the record (the write did commit) and emits it then, or
        decides afresh; either way it is said exactly once."""
        if report is not None:
            self._unreported[record.path] = report
        if status == KEPT:
            with self._counts_lock:
                self._decided[record.path] = time.monotonic()
                self._decided.move_to_end(record.path)
                while len(self._decided) > DECIDED_MEMORY:
                    self._decided.popitem(last=False)
        if record.id is None:
            if not claimed:
                self.store.insert(record.with_(status=status))
        elif status == UNRESOLVED and record.status != UNRESOLVED:
            self.store.update(record.with_(status=UNRESOLVED))
        elif status == KEPT and record.status not in LIVE_STATUSES:
            self.store.update(record.with_(status="kept"))
        if report is not None:
            self._unreported.pop(record.path, None)
            emit(report[0], report[1], **report[2])  # type: ignore[arg-type]
