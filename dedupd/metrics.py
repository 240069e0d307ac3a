"""Prometheus metrics of the daemon, with prometheus_client: what it decided, how fast, and
how it is doing, for a graph and an alert instead of a journal query.

Counters follow the events (a listener on events.emit), so the metrics and the log never
disagree; gauges are read from the daemon when scraped or written. Served over HTTP
(`metrics.listen`) and/or written for node_exporter's textfile collector
(`metrics.textfile`). Labels are bounded: outcomes, reasons and event kinds are fixed
sets, roots and groups come from the configuration; never a path of an image. A metrics
failure (port taken, textfile unwritable) is logged and the daemon goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from dedupd.config import Config
from dedupd.events import Event, add_listener, delivery, remove_listener

log = logging.getLogger("dedupd.metrics")

DECISIONS = (Event.IMAGE_ACCEPTED, Event.DUPLICATE_QUARANTINED, Event.DUPLICATE_LOGGED,
             Event.DUPLICATE_DELETED)
# How often the textfile is rewritten (node_exporter reads it when scraped).
TEXTFILE_SECONDS = 10.0
# At most this many distinct values of a free-form label (rejection reasons); the rest
# are counted as "other".
LABEL_VALUES_MAX = 32


@dataclass(frozen=True)
class DaemonState:
    """What the gauges show, read from the daemon at scrape time."""

    queue_depth: int
    queued_total: int  # files that entered the queue since the start
    store_available: bool
    indexed: dict[str, int] = field(default_factory=dict)  # group -> live images
    pending_quarantines: int | None = None
    breakers_open: dict[str, bool] = field(default_factory=dict)  # root -> open
    last_reconcile: float | None = None  # Unix time of the last finished root scan


class Refreshed:
    """A costly value (a count over the store) computed at most every `seconds`; the last
    one (or None) while it cannot be computed."""

    def __init__(self, compute: Callable[[], int], seconds: float) -> None:
        self.compute, self.seconds = compute, seconds
        self._value: int | None = None
        self._at = -float("inf")
        self._lock = threading.Lock()

    def __call__(self) -> int | None:
        with self._lock:
            if time.monotonic() - self._at >= self.seconds:
                self._at = time.monotonic()
                try:
                    self._value = self.compute()
                except Exception as exc:  # the store away: the gauge keeps its last value
                    log.debug("metrics: cannot count: %s", exc)
            return self._value


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], DaemonState]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            state = self.read()
        except Exception:  # a scrape must not fail because the daemon is busy
            log.debug("reading the daemon's state for metrics failed", exc_info=True)
            return
        yield GaugeMetricFamily("dedupd_queue_depth", "Files waiting to be hashed",
                                value=state.queue_depth)
        yield CounterMetricFamily("dedupd_files_queued", "Files queued to be looked at "
                                  "(new, changed, or found by a scan)", value=state.queued_total)
        yield GaugeMetricFamily("dedupd_store_available",
                                "1 while the hash dictionary answers, 0 during an outage",
                                value=int(state.store_available))
        indexed = GaugeMetricFamily("dedupd_indexed_images",
                                    "Live images in the dictionary", labels=["group"])
        for group, n in sorted(state.indexed.items()):
            indexed.add_metric([group], n)
        yield indexed
        if state.pending_quarantines is not None:
            yield GaugeMetricFamily("dedupd_pending_quarantines",
                                    "Duplicates that could not be moved yet (retried)",
                                    value=state.pending_quarantines)
        breaker = GaugeMetricFamily("dedupd_circuit_open",
                                    "1 while a root's circuit breaker holds it log-only",
                                    labels=["root"])
        for root, is_open in sorted(state.breakers_open.items()):
            breaker.add_metric([root], int(is_open))
        yield breaker
        if state.last_reconcile is not None:
            yield GaugeMetricFamily("dedupd_last_reconcile_timestamp_seconds",
                                    "When a reconciliation of a root last finished",
                                    value=state.last_reconcile)


class _DeliveryCollector(Collector):
    """Events that missed journald (written to stderr instead) or were lost altogether."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        missed = delivery()
        yield CounterMetricFamily("dedupd_log_events_dropped",
                                  "Events lost: journald refused them and stderr failed too",
                                  value=missed["dropped"])
        yield CounterMetricFamily("dedupd_log_journal_fallbacks",
                                  "Events journald refused, written to stderr instead",
                                  value=missed["journal_fallbacks"])


class Metrics:
    """The daemon's metrics: one registry, its counters fed by events."""

    def __init__(self, config: Config, read_state: Callable[[], DaemonState] | None = None
                 ) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "dedupd_decisions", "Decisions on images by outcome, root and group",
            ["outcome", "root", "group"], registry=self.registry)
        self.rejections = Counter(
            "dedupd_rejections", "Images rejected (bad input, or a move that failed) by "
            "reason", ["reason", "root", "group"], registry=self.registry)
        self.events = Counter("dedupd_events", "Events logged, by kind", ["event"],
                              registry=self.registry)
        self.hash_seconds = Histogram(
            "dedupd_hash_seconds", "Time to read, decode and hash one image",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
            registry=self.registry)
        self.latency_seconds = Histogram(
            "dedupd_decision_latency_seconds", "From a file's arrival in the queue to its "
            "logged decision (includes the settle delay of files still being written)",
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry)
        self.registry.register(_DeliveryCollector())
        if read_state is not None:
            self.registry.register(_StateCollector(read_state))
        self._reasons: set[str] = set()
        self._arrival = threading.local()
        self._server: Any = None
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._textfile_error: str | None = None
        self._started = False
        self.configure(config)

    def configure(self, config: Config) -> None:
        """(Re)read the roots and groups; every root's decision counters start at 0. A new
        textfile path applies at once; a new listen address at the next start."""
        old = getattr(self, "config", None)
        if old is not None and old.metrics.listen != config.metrics.listen:
            log.warning("metrics.listen changed: it takes effect when dedupd restarts")
        self.config = config
        if old is not None and self._started and self._writer is None:
            self._start_writer()
        for w in config.watches:
            for event in DECISIONS:
                self.decisions.labels(event.value, str(w.path), w.scope)

    # -- feeding
    def on_event(self, event: Event, fields: dict[str, Any]) -> None:
        """events listener: count decisions and rejections, observe decision latency."""
        self.events.labels(event.value).inc()
        if event not in DECISIONS and event is not Event.IMAGE_REJECTED:
            return
        root, group = self._root_and_group(fields)
        if event is Event.IMAGE_REJECTED:
            reason = str(fields.get("kind") or "unknown")
            if reason not in self._reasons:
                if len(self._reasons) >= LABEL_VALUES_MAX:
                    reason = "other"
                else:
                    self._reasons.add(reason)
            self.rejections.labels(reason, root, group).inc()
        else:
            self.decisions.labels(event.value, root, group).inc()
        arrived = getattr(self._arrival, "time", None)
        if arrived is not None:  # once per file: a replacement logs two decisions
            self._arrival.time = None
            self.latency_seconds.observe(max(0.0, time.monotonic() - arrived))

    def _root_and_group(self, fields: dict[str, Any]) -> tuple[str, str]:
        where = fields.get("root") or fields.get("path")
        watch = self.config.watch_for(str(where)) if where else None
        if watch is None:
            return "", ""
        return str(watch.path), watch.scope

    def arrived(self, monotonic: float | None) -> None:
        """The calling worker starts on a file that arrived at `monotonic`: the next
        decision this thread logs is observed as that file's latency."""
        self._arrival.time = monotonic

    def observe_hash(self, seconds: float) -> None:
        self.hash_seconds.observe(seconds)

    # -- exporting
    def start(self) -> None:
        self._started = True
        add_listener(self.on_event)
        listen = self.config.metrics.listen
        if listen is not None:
            host, port = listen
            try:
                self._server, _thread = start_http_server(port, host, self.registry)
                log.info("metrics served on http://%s:%d/metrics", host, port)
            except OSError as exc:
                log.error("metrics: cannot listen on %s:%d: %s; no metrics endpoint",
                          host, port, exc.strerror or exc)
        self._start_writer()

    def _start_writer(self) -> None:
        if self.config.metrics.textfile is not None:
            self._writer = threading.Thread(target=self._write_loop, name="dedupd-metrics",
                                            daemon=True)
            self._writer.start()

    def stop(self) -> None:
        remove_listener(self.on_event)
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
            self.write_textfile()  # the final counts
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self.write_textfile()
            self._stop.wait(TEXTFILE_SECONDS)

    def write_textfile(self) -> bool:
        """Write the textfile (atomically: prometheus_client renames a temporary file)."""
        path = self.config.metrics.textfile
        if path is None:
            return False
        try:
            write_to_textfile(str(path), self.registry)
        except OSError as exc:
            error = f"{path}: {exc.strerror or exc}"
            if error != self._textfile_error:  # once per distinct problem
                log.error("metrics: cannot write the textfile %s", error)
            self._textfile_error = error
            return False
        self._textfile_error = None
        return True
