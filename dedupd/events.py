"""Placeholder for the structured event log (replaced by the journald/json implementation).

API: emit(Event.X, message, **fields), emit_summary(), counts(), setup_logging(mode, level).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import Counter


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


_log = logging.getLogger("dedupd")
_lock = threading.Lock()
_total: Counter[str] = Counter()


def setup_logging(mode: str = "auto", level: str = "info") -> None:
    logging.basicConfig(level=level.upper(), format="dedupd: %(message)s")


def emit(event: Event, message: str, *, priority: int | None = None, **fields: object) -> None:
    with _lock:
        _total[event.value] += 1
    extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    _log.info("%s: %s %s", event.value, message, extra)


def emit_summary() -> None:
    return None


def counts() -> dict[str, int]:
    with _lock:
        return dict(_total)
