"""Structured events: the monitoring interface of dedupd.

Every decision is one event with a stable MESSAGE_ID (never change one: dashboards and
alerts match on it) and DEDUPD_* fields. Under systemd they go to journald through
systemd-python; otherwise to stderr as human lines, or as one JSON object per line
(`--log json`, for Loki/Vector/Fluent Bit) with the same fields in lower case.
journald rate-limits a service, so a periodic SUMMARY event carries the counts per
kind since the previous one: monitoring stays right when a burst is suppressed.

Logging never takes the service down: when journald refuses an event (restarting, gone)
it is written to stderr instead (systemd captures that too) and counted, and the next
event tries journald again. Every event is one write(2), so lines from threads never
interleave. File names are data: messages are escaped to one line of UTF-8 (control
characters and bytes that are not UTF-8 as \\xNN), JSON fields hold the exact name when it is
UTF-8, journald fields hold its exact bytes.
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
    RECONCILE_STARTED = "reconcile_started"
    RECONCILE_FINISHED = "reconcile_finished"


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
    Event.RECONCILE_STARTED: "f253d5a715a6436aa3ca2ecfd58d559e",
    Event.RECONCILE_FINISHED: "e75bb7be1c714d1b9bd633db7b788c82",
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
    Event.RECONCILE_STARTED: INFO,
    Event.RECONCILE_FINISHED: NOTICE,
}

_PRIORITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_LOGGING_TO_SYSLOG = {logging.DEBUG: DEBUG, logging.INFO: INFO, logging.WARNING: WARNING,
                      logging.ERROR: ERR, logging.CRITICAL: CRIT}


class _State:
    mode = "stderr"
    threshold = INFO
    lock = threading.Lock()
    write_lock = threading.Lock()  # one event, one write(2), in order
    total: Counter[str] = Counter()
    since: Counter[str] = Counter()
    since_time = time.monotonic()
    listeners: list[Callable[[Event, dict[str, Any]], None]] = []
    journal_down: str | None = None  # why journald refused the last event, while it does
    fallbacks = 0  # events written to stderr because journald refused them
    dropped = 0  # events that reached neither journald nor stderr


# Escapes that keep any file name on one line: C0/C1 controls, DEL, and the Unicode
# line and paragraph separators some viewers break lines at.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def _unicode(text: str) -> str:
    """text with the bytes that are not UTF-8 (surrogate escapes of os.fsdecode) as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("ascii")
    return raw.decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """One line of valid UTF-8 for any text holding file names: a name with a newline
    cannot forge a log line, one with bytes that are not UTF-8 cannot break the writer."""
    if text.isprintable():
        return text
    return _unicode(text).translate(_ESCAPES)


def _json_value(value: Any) -> Any:
    """A JSON-encodable field: paths as text, names that are not UTF-8 escaped."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if isinstance(value, str):
        return value if value.isprintable() else _unicode(value)
    return value


def json_safe(obj: Any) -> Any:
    """obj for json.dumps: every string holding bytes that are not UTF-8 escaped (\\xNN),
    paths as text; other strings exact (JSON escapes a newline itself)."""
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return _json_value(obj)


def _journal_value(value: Any) -> str | bytes:
    """journald fields are bytes: a file name goes in exactly, whatever its encoding."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        return value
    text = str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")  # os.fsdecode'd bytes, exactly
        except UnicodeEncodeError:
            return _unicode(text)


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
    root.addHandler(_Handler())
    # Python warnings (a library's RuntimeWarning) take the same way: printed raw on
    # stderr they would break --log json's one object per line.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [_Handler()]
    warnings_log.propagate = False
    return mode


class _Handler(logging.Handler):
    """Log records (not events) take the same way as events: journald with the stderr
    fallback, or one line per record on stderr, one write each."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = _LOGGING_TO_SYSLOG.get(record.levelno, INFO)
            message = printable(record.getMessage())
            trace = _TRACEBACKS.formatException(record.exc_info) if record.exc_info else ""
            obj = {"ts": _iso(record.created), "priority": prio, "logger": record.name,
                   "message": message}
            if trace:
                obj["exception"] = trace
            if _State.mode == "journald":
                full = f"{message}\n{trace}" if trace else message
                _to_journal(full, prio, {"LOGGER": record.name}, obj)
                return
            if _State.mode == "json":
                line = json.dumps(obj)
            else:
                line = f"dedupd: {record.levelname}: {message}"
                if trace:  # each line marked, so a traceback cannot pass for a record
                    line += "".join(f"\ndedupd:   | {t}" for t in trace.splitlines())
            _write_line(line)
        except Exception:  # logging must never raise into the caller
            with _State.lock:
                _State.dropped += 1


# Formats a record's traceback. Not Handler.formatter: logging.Handler.__init__ sets that
# to None on every instance, and a record with exc_info then raised inside emit() and was
# silently counted as dropped ("processing ... failed" never reached any log).
_TRACEBACKS = logging.Formatter()


def _write_line(line: str) -> bool:
    """Write one line to stderr in a single write(2) (threads never interleave inside a
    line); False if stderr is gone (the event is then counted as dropped)."""
    data = (line + "\n").encode("utf-8", "backslashreplace")
    with _State.write_lock:
        try:
            try:
                fd = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):  # replaced stream (tests)
                sys.stderr.write(data.decode())
                sys.stderr.flush()
                return True
            sys.stderr.flush()  # whatever print() left buffered goes first
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return True
        except (OSError, ValueError):
            with _State.lock:
                _State.dropped += 1
            return False


def _to_journal(message: str, prio: int, fields: dict[str, Any], obj: dict[str, Any]) -> None:
    """Send to journald. When it refuses, write the event to stderr instead (with a note
    the first time): `<prio>` + the JSON object, which the journal's stdout stream stores
    with its priority and every field; the next event tries journald again."""
    try:
        from systemd import journal

        journal.sendv(f"MESSAGE={message}", f"PRIORITY={prio}", "SYSLOG_IDENTIFIER=dedupd",
                      *(f"{k}=".encode() + v if isinstance(v, bytes) else f"{k}={v}"
                        for k, v in ((k, _journal_value(v)) for k, v in fields.items())))
    except Exception as exc:  # OSError (refused, gone, full), or an unencodable field
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        with _State.lock:
            first, _State.journal_down = _State.journal_down is None, why
            _State.fallbacks += 1
        if first:
            _write_line(f"<{WARNING}>dedupd: journald refused an event ({why}): events go to "
                        "stderr until it answers again")
        _write_line(f"<{prio}>" + json.dumps(obj, default=str))
        return
    if _State.journal_down is not None:
        with _State.lock:
            down, _State.journal_down = _State.journal_down, None
            fallbacks = _State.fallbacks
        if down is not None:
            with contextlib.suppress(Exception):
                from systemd import journal

                journal.sendv(f"MESSAGE=journald answers again; {fallbacks} events went to "
                              f"stderr since dedupd started (last refusal: {down})",
                              f"PRIORITY={NOTICE}", "SYSLOG_IDENTIFIER=dedupd",
                              f"DEDUPD_JOURNAL_FALLBACKS={fallbacks}")


def _iso(t: float) -> str:
    """UTC with microseconds: latency from a file's arrival to its decision is read off it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def journal_fields(event: Event, fields: dict[str, Any]) -> dict[str, str | bytes]:
    """DEDUPD_* journald fields for an event's keyword fields (None values dropped); a
    file name that is not UTF-8 is sent as its bytes."""
    out: dict[str, str | bytes] = {"DEDUPD_EVENT": event.value}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        out[f"DEDUPD_{key.upper()}"] = _journal_value(value)
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
    text = printable(message)
    obj: dict[str, Any] = {"ts": _iso(time.time()), "event": event.value,
                           "message_id": MESSAGE_IDS[event], "priority": prio,
                           "message": text}
    obj.update({k: _json_value(v) for k, v in fields.items() if v is not None})
    if _State.mode == "journald":
        _to_journal(text, prio, {"MESSAGE_ID": MESSAGE_IDS[event],
                                 **journal_fields(event, fields)}, obj)
        return
    if _State.mode == "json":
        line = json.dumps(obj, default=str)
    else:
        line = f"dedupd: {event.value}: {text}"
        if prio <= WARNING:
            line = f"dedupd: <{_PRIORITY_NAMES[prio]}> {event.value}: {text}"
    _write_line(line)


def emit_summary() -> None:
    """One SUMMARY event with the count of each event kind since the previous summary."""
    with _State.lock:
        since, _State.since = _State.since, Counter()
        elapsed = time.monotonic() - _State.since_time
        _State.since_time = time.monotonic()
    text = ", ".join(f"{n} {k}" for k, n in sorted(since.items())) or "no events"
    lost = delivery()
    if any(lost.values()):
        text += (f"; since start {lost['journal_fallbacks']} events went to stderr because "
                 f"journald refused them, {lost['dropped']} were dropped")
    emit(Event.SUMMARY, f"last {elapsed:.0f} s: {text}", interval=round(elapsed, 1),
         **{f"count_{k}": since.get(k, 0) for k in (e.value for e in Event)
            if k not in ("summary",)}, **lost)


def counts() -> dict[str, int]:
    """Totals per event kind since the process started."""
    with _State.lock:
        return dict(_State.total)


def delivery() -> dict[str, int]:
    """Events that missed their destination since the process started: written to stderr
    because journald refused them, or dropped because stderr failed too."""
    with _State.lock:
        return {"journal_fallbacks": _State.fallbacks, "dropped": _State.dropped}
