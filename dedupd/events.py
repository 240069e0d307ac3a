"""Structured events: the monitoring interface of dedupd.

Every decision is one event with a stable MESSAGE_ID (never change one: dashboards and
alerts match on it) and DEDUPD_* fields. Under systemd they go to journald through
systemd-python; otherwise to stderr as human lines, or as one JSON object per line
(`--log json`, for Loki/Vector/Fluent Bit) with the same fields in lower case.
journald rate-limits a service, so a periodic SUMMARY event carries the counts per
kind since the previous one: monitoring stays right when a burst is suppressed.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

# syslog priorities
EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)
LEVELS = {"debug": DEBUG, "info": INFO, "notice": NOTICE, "warning": WARNING, "error": ERR}


class Event(enum.StrEnum):
    DUPLICATE_QUARANTINED = "duplicate_quarantined"
    DUPLICATE_LOGGED = "duplicate_logged"
    DUPLICATE_DELETED = "duplicate_deleted"
    IMAGE_ACCEPTED = "image_accepted"
    IMAGE_REJECTED = "image_rejected"
    RESTORED = "restored"
    RELOADED = "config_reloaded"
    RELOAD_FAILED = "reload_failed"
    OVERFLOW_RESCAN = "overflow_rescan"
    CIRCUIT_OPEN = "circuit_open"
    STARTED = "started"
    STOPPED = "stopped"
    SUMMARY = "summary"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_RECOVERED = "store_recovered"


# Stable forever; deploy/dedupd.catalog explains each one (`journalctl -x`).
MESSAGE_IDS: dict[Event, str] = {
    Event.DUPLICATE_QUARANTINED: "8b987181175c4384926e9fadbd632c27",
    Event.DUPLICATE_LOGGED: "3defe7ed99da4bada7ee72769ed1c8bb",
    Event.DUPLICATE_DELETED: "d8e799cd1cb744fcb1bbce9ed948cd34",
    Event.IMAGE_ACCEPTED: "04fd1faeef1f4764a78f75fca2acdee5",
    Event.IMAGE_REJECTED: "f66b38055028463db35b8768367f9ec9",
    Event.RESTORED: "9e19c9ec7390403ebd2deae89b7f4d06",
    Event.RELOADED: "838c92923e5148afb1bfb7ce6f4e1fbe",
    Event.RELOAD_FAILED: "61a03b2d042c4e9e8c7143f80833fe69",
    Event.OVERFLOW_RESCAN: "4129e5cd2bad4045b891c988f0ab4c45",
    Event.CIRCUIT_OPEN: "8d43ead92bdb4f3b8c5e18427432c753",
    Event.STARTED: "63d0272254c2464b98277d4cfb8c5573",
    Event.STOPPED: "6afba8f14e154d0a8a1c5202f7cfb90a",
    Event.SUMMARY: "eb7cc0fc19884dbda15062b27d552583",
    Event.STORE_UNAVAILABLE: "c1b8e26d0e164ca38c3e624e9229ef95",
    Event.STORE_RECOVERED: "7b32efd500d244e3875595256e715288",
}

PRIORITIES: dict[Event, int] = {
    Event.DUPLICATE_QUARANTINED: NOTICE,
    Event.DUPLICATE_LOGGED: NOTICE,
    Event.DUPLICATE_DELETED: NOTICE,
    Event.IMAGE_ACCEPTED: INFO,
    Event.IMAGE_REJECTED: WARNING,
    Event.RESTORED: NOTICE,
    Event.RELOADED: NOTICE,
    Event.RELOAD_FAILED: ERR,
    Event.OVERFLOW_RESCAN: WARNING,
    Event.CIRCUIT_OPEN: CRIT,
    Event.STARTED: NOTICE,
    Event.STOPPED: NOTICE,
    Event.SUMMARY: INFO,
    Event.STORE_UNAVAILABLE: ERR,
    Event.STORE_RECOVERED: NOTICE,
}

_PRIORITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_LOGGING_TO_SYSLOG = {logging.DEBUG: DEBUG, logging.INFO: INFO, logging.WARNING: WARNING,
                      logging.ERROR: ERR, logging.CRITICAL: CRIT}


class _State:
    mode = "stderr"
    threshold = INFO
    lock = threading.Lock()
    total: Counter[str] = Counter()
    since: Counter[str] = Counter()
    since_time = time.monotonic()
    listeners: list[Callable[[Event, dict[str, Any]], None]] = []


def under_systemd() -> bool:
    """True when stderr is connected to the journal (JOURNAL_STREAM) or we run in a unit."""
    stream = os.environ.get("JOURNAL_STREAM")
    if stream:
        try:
            st = os.fstat(sys.stderr.fileno())
            if f"{st.st_dev}:{st.st_ino}" == stream:
                return True
        except (OSError, ValueError):
            pass
    return bool(os.environ.get("INVOCATION_ID"))


def resolve_mode(mode: str) -> str:
    """auto means journald under systemd, stderr otherwise."""
    if mode == "auto":
        return "journald" if under_systemd() else "stderr"
    return mode


def setup_logging(mode: str = "auto", level: str = "info") -> str:
    """Choose where events and log records go; returns the resolved mode."""
    mode = resolve_mode(mode)
    _State.mode, _State.threshold = mode, LEVELS.get(level, INFO)
    root = logging.getLogger("dedupd")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    if mode == "journald":
        from systemd.journal import JournalHandler

        root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="dedupd"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter() if mode == "json" else
                             logging.Formatter("dedupd: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    return mode


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": _iso(record.created), "priority": _LOGGING_TO_SYSLOG.get(record.levelno,
                                                                            INFO),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def _iso(t: float) -> str:
    """UTC with microseconds: latency from a file's arrival to its decision is read off it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def journal_fields(event: Event, fields: dict[str, Any]) -> dict[str, str]:
    """DEDUPD_* journald fields for an event's keyword fields (None values dropped)."""
    out = {"DEDUPD_EVENT": event.value}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        out[f"DEDUPD_{key.upper()}"] = str(value)
    return out


def add_listener(listener: Callable[[Event, dict[str, Any]], None]) -> None:
    """Call listener(event, fields) for every event, whatever the log level (metrics)."""
    _State.listeners.append(listener)


def remove_listener(listener: Callable[[Event, dict[str, Any]], None]) -> None:
    with contextlib.suppress(ValueError):
        _State.listeners.remove(listener)


def emit(event: Event, message: str, *, priority: int | None = None, **fields: Any) -> None:
    """Log one event. Fields: path, match, distance, action, quarantine_path, hash, policy,
    root, reason, kind, ... (become DEDUPD_PATH, DEDUPD_MATCH, ...)."""
    prio = PRIORITIES[event] if priority is None else priority
    with _State.lock:
        _State.total[event.value] += 1
        if event is not Event.SUMMARY:
            _State.since[event.value] += 1
    for listener in _State.listeners:
        try:
            listener(event, fields)
        except Exception:  # monitoring failing never takes the service down
            logging.getLogger("dedupd.events").debug("event listener failed", exc_info=True)
    if prio > _State.threshold:
        return
    if _State.mode == "journald":
        from systemd import journal

        journal.send(message, MESSAGE_ID=MESSAGE_IDS[event], PRIORITY=str(prio),
                     SYSLOG_IDENTIFIER="dedupd", **journal_fields(event, fields))
        return
    if _State.mode == "json":
        obj: dict[str, Any] = {"ts": _iso(time.time()), "event": event.value,
                               "message_id": MESSAGE_IDS[event], "priority": prio,
                               "message": message}
        obj.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(obj, default=str)
    else:
        line = f"dedupd: {event.value}: {message}"
        if prio <= WARNING:
            line = f"dedupd: <{_PRIORITY_NAMES[prio]}> {event.value}: {message}"
    with contextlib.suppress(OSError, ValueError):  # stderr gone: events are best effort
        print(line, file=sys.stderr, flush=True)


def emit_summary() -> None:
    """One SUMMARY event with the count of each event kind since the previous summary."""
    with _State.lock:
        since, _State.since = _State.since, Counter()
        elapsed = time.monotonic() - _State.since_time
        _State.since_time = time.monotonic()
    text = ", ".join(f"{n} {k}" for k, n in sorted(since.items())) or "no events"
    emit(Event.SUMMARY, f"last {elapsed:.0f} s: {text}", interval=round(elapsed, 1),
         **{f"count_{k}": since.get(k, 0) for k in (e.value for e in Event)
            if k not in ("summary",)})


def counts() -> dict[str, int]:
    """Totals per event kind since the process started."""
    with _State.lock:
        return dict(_State.total)
