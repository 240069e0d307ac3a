"""Carry out a decision and say so: the one place a file is kept, moved to quarantine,
deleted, left unresolved, or rejected as bad input, each with its event.

The pipeline (dedupd.pipeline) decides; this module touches the user's files and writes
the decision to the store. Every report is said exactly once, also when the store fails
between the write and the log line (see Actor.keep).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dedupd.config import Config, Watch
from dedupd.events import Event, emit
from dedupd.hashing import ImageError, ImageHash, hash_to_hex
from dedupd.policy import ACCEPT, REPLACE, Decision
from dedupd.quarantine import Quarantine, QuarantineError, move_no_replace, partial_path
from dedupd.store import ImageRecord, Match, QuarantineEntry, Store
from dedupd.store.base import KEPT, LIVE_STATUSES, UNRESOLVED, Rejection

log = logging.getLogger("dedupd.pipeline")
# How many recent decisions keep: first remembers: a file still in the queue competes by
# arrival only with copies decided while it waited (bounded by the queue and workers).
DECIDED_MEMORY = 50_000
# Kinds of bad input moved to rejected_dir (when set). Truncated files stay: a slow
# writer may still be finishing them, and a later close event brings them back.
MOVABLE_REJECTS = ("empty", "corrupt", "unsupported", "too_large")

Report = tuple[Event, str, dict[str, object]]


@dataclass(frozen=True)
class Outcome:
    """What the pipeline did with one image, for callers that report (scan)."""

    accepted: bool
    action: str | None = None  # quarantine, delete or log, for a duplicate
    match: Match | None = None  # the copy duplicates (or that it replaced)
    loser: str | None = None  # the path acted on: the newcomer, or the older copy
    moved_to: str | None = None  # where quarantine put the loser


class Actor:
    """Acts on decisions, keeps the counts, and holds reports a store outage cut off."""

    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.quarantine = Quarantine(store, config.quarantine_dir)
        self.counts = {"processed": 0, "accepted": 0, "duplicates": 0, "quarantined": 0,
                       "rejected": 0}
        self._counts_lock = threading.Lock()
        # Decisions whose store write failed mid-way: reported once a retry knows.
        self._unreported: dict[str, Report] = {}
        # When each recently kept path was decided (time.monotonic()), for keep: first.
        self._decided: OrderedDict[str, float] = OrderedDict()
        # Duplicates left unresolved, with the reason said (said once until it changes).
        self._said_unresolved: OrderedDict[str, str] = OrderedDict()
        # Where a file goes to be decided again (the daemon's queue); a scan has none:
        # its next run decides such a file.
        self.requeue: Callable[[Path, float], None] | None = None
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.quarantine.directory = config.quarantine_dir
        # rejected_dir is laid out like the quarantine (root/relative path), unjournalled.
        self.rejects = None if config.rejected_dir is None else \
            Quarantine(self.store, config.rejected_dir)

    def count(self, key: str) -> None:
        with self._counts_lock:
            self.counts[key] += 1

    def decided_at(self, path: str) -> float | None:
        """When (monotonic) path was last kept by a decision here, if recently."""
        with self._counts_lock:
            return self._decided.get(path)

    def hold(self, path: str, report: Report | None) -> None:
        """Keep report for path until it is said (or dropped, with report None)."""
        if report is None:
            self._unreported.pop(path, None)
        else:
            self._unreported[path] = report

    def report_interrupted(self, path: Path) -> None:
        """The store already holds path's record: if its write was cut off by an outage
        before the decision was logged, log it now (exactly once)."""
        report = self._unreported.pop(str(path), None)
        if report is not None:
            emit(report[0], report[1], **report[2])  # type: ignore[arg-type]

    def accepted(self, path: Path, watch: Watch, record: ImageRecord, hashed: ImageHash
                 ) -> Report:
        return (Event.IMAGE_ACCEPTED, f"{path}: accepted", dict(
            path=str(path), hash=hash_to_hex(record.hash, self.config.recipe.size),
            root=str(watch.path), policy=self.config.policy_for(watch).name,
            low_information=hashed.low_information or None))

    def act(self, decision: Decision, path: Path, watch: Watch, record: ImageRecord,
            hashed: ImageHash, *, claimed: bool) -> Outcome:
        """Keep the newcomer, or remove (or only log) the loser of a duplicate pair."""
        policy = self.config.policy_for(watch)
        if decision.verdict == ACCEPT:
            self.keep(record, self.accepted(path, watch, record, hashed), claimed=claimed)
            self.count("accepted")
            return Outcome(accepted=True)
        match = decision.match
        assert match is not None
        self.count("duplicates")
        if decision.verdict == REPLACE:  # the newcomer is larger, or came first
            loser, winner = match.record, record
            # The newcomer is decided too: kept, and said so (every decision once).
            self.keep(winner, self.accepted(path, watch, record, hashed), claimed=claimed)
            self.count("accepted")
        else:
            loser, winner = record, match.record
        outcome = Outcome(accepted=decision.verdict == REPLACE, action=decision.action,
                          match=match, loser=loser.path)
        # How the two differ, for people and scripts: a flip or rotation, and whether the
        # newcomer's hash alone said little (the signature or the digest decided).
        extra = dict(transform=match.transform,
                     low_information=hashed.low_information or None)
        fields = dict(path=loser.path, match=winner.path, distance=match.distance,
                      hash=hash_to_hex(loser.hash, self.config.recipe.size),
                      policy=policy.name, root=str(watch.path), action=decision.action,
                      identical=match.identical, **extra)
        what = f"{loser.path}: duplicate of {winner.path} (distance {match.distance})"
        if decision.action == "log" and policy.action == "log":
            self.keep(loser, (Event.DUPLICATE_LOGGED, f"{what}; left in place (log only)",
                              fields))
        elif decision.action == "log":  # the breaker holds back a removal: not settled
            self.keep(loser, (Event.DUPLICATE_LOGGED, f"{what}; left in place, unresolved "
                              "(circuit breaker open: log-only until a reload)", fields),
                      status=UNRESOLVED)
        elif decision.action == "delete":
            try:
                os.unlink(loser.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                return self.unresolved(loser, watch, f"cannot delete: {exc.strerror or exc}",
                                       outcome)
            if loser.id is not None:
                self.store.delete(loser.id)
            self._resolved(loser.path)
            emit(Event.DUPLICATE_DELETED, f"{what}; deleted", **fields)  # type: ignore[arg-type]
        else:
            loser_watch = self.config.watch_for(loser.path)
            try:
                entry = self.quarantine.move_in(
                    Path(loser.path), loser_watch.path if loser_watch else None, record=loser,
                    matched_path=winner.path, distance=match.distance,
                    hash_hex=fields["hash"], policy=policy.name,  # type: ignore[arg-type]
                    transform=match.transform, low_information=hashed.low_information)
            except QuarantineError as exc:
                return self.unresolved(loser, watch, str(exc), outcome)
            self.report_quarantined(entry, root=str(watch.path), identical=match.identical,
                                    **extra)
            outcome = replace(outcome, moved_to=entry.quarantine_path)
        return outcome

    def unresolved(self, loser: ImageRecord, watch: Watch, why: str,
                   outcome: Outcome) -> Outcome:
        """A removal the policy wants failed: the file stays, recorded as unresolved (not
        kept), and is decided again (the daemon retries such files every half minute,
        and at a rescan, reload or start). Said once per file and reason: a quarantine
        that stays full does not repeat its line per file every half minute."""
        with self._counts_lock:
            said = self._said_unresolved.get(loser.path) == why
        if said:
            log.debug("%s: still unresolved: %s", loser.path, why)
            self.keep(loser, status=UNRESOLVED)
        else:
            said_why = why.removeprefix(f"{loser.path}: ")  # the path once per line
            self.keep(loser, (Event.IMAGE_REJECTED, f"{loser.path}: duplicate, but "
                              f"{said_why}; left in place, unresolved (retried)", dict(
                                  path=loser.path, reason=why, kind="quarantine_failed",
                                  root=str(watch.path))), status=UNRESOLVED)
            with self._counts_lock:  # said (keep() emitted it, or holds it for a retry)
                self._said_unresolved[loser.path] = why
                while len(self._said_unresolved) > DECIDED_MEMORY:
                    self._said_unresolved.popitem(last=False)
        return replace(outcome, action="log")

    def _resolved(self, path: str) -> None:
        """path is no longer an unresolved duplicate: a later failure is said again."""
        with self._counts_lock:
            self._said_unresolved.pop(path, None)

    def report_quarantined(self, entry: QuarantineEntry, **fields: object) -> None:
        """Count and log a finished quarantine move: one just made, or one an outage
        interrupted and Quarantine.finish_moves() completed later."""
        self.count("quarantined")
        self._resolved(entry.original_path)
        emit(Event.DUPLICATE_QUARANTINED, f"{entry.original_path}: duplicate of "
             f"{entry.matched_path} (distance {entry.distance}); moved to "
             f"{entry.quarantine_path}", path=entry.original_path, match=entry.matched_path,
             distance=entry.distance, hash=entry.hash, policy=entry.policy,
             action="quarantine", quarantine_path=entry.quarantine_path, **fields)

    def keep(self, record: ImageRecord, report: Report | None = None,
             claimed: bool = False, status: str = KEPT) -> None:
        """Record a file as part of its dataset (unless `claimed` did), or as an
        unresolved duplicate, then emit `report`. If the store fails mid-write the report
        waits: the retry finds the record (the write did commit) and emits it then, or
        decides afresh; either way it is said exactly once."""
        if report is not None:
            self._unreported[record.path] = report
        if status == KEPT:
            self._resolved(record.path)
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
            if claimed:  # said once the claim is durable (the store may flush later)
                self.store.settle(record.path, lambda: emit(  # type: ignore[arg-type]
                    report[0], report[1], **report[2]), lambda: self.lost(record))
            else:
                emit(report[0], report[1], **report[2])  # type: ignore[arg-type]

    def lost(self, record: ImageRecord) -> None:
        """A database crash took a claimed record before it was flushed (nothing was
        said about the file yet): it is decided again, in its place by arrival."""
        log.warning("%s: its record was lost in a database crash; deciding it again",
                    record.path)
        if self.requeue is not None:
            self.requeue(Path(record.path), record.first_seen)

    def known_reject(self, path: Path, st: os.stat_result) -> bool:
        """Rejected before, as it is now (same size and mtime): not said again."""
        old = self.store.get_rejection(str(path))
        return old is not None and (old.file_size, old.mtime_ns) == (st.st_size,
                                                                     st.st_mtime_ns)

    def reject(self, path: Path, watch: Watch, exc: ImageError, st: os.stat_result) -> None:
        """Bad input: moved to rejected_dir (when set, for the kinds that cannot be a
        file still being written), else left in place and remembered so that it is said
        once, until the file changes."""
        self.count("rejected")
        moved_to = None
        if self.rejects is not None and exc.kind in MOVABLE_REJECTS:
            try:
                target = self.rejects.target_for(path, watch.path)
                move_no_replace(path, target, partial_path(target, os.getpid()))
                moved_to = str(target)
            except (OSError, QuarantineError) as err:
                log.warning("%s: cannot move to %s: %s", path, self.rejects.directory, err)
        if moved_to is None:
            self.store.put_rejection(Rejection(str(path), st.st_size, st.st_mtime_ns,
                                               exc.kind, exc.reason))
        emit(Event.IMAGE_REJECTED, f"{path}: {exc.kind}: {exc.reason}"
             + (f"; moved to {moved_to}" if moved_to else "; left in place"),
             path=str(path), reason=exc.reason, kind=exc.kind, root=str(watch.path),
             quarantine_path=moved_to)
