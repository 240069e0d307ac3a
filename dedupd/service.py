"""systemd service protocol (sd_notify's datagrams): READY, STATUS, WATCHDOG,
RELOADING and STOPPING. Without NOTIFY_SOCKET every call is a no-op, so the same code
runs in a terminal, in tests and under systemd.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dedupd.service")
# How long one notification may wait for a manager that does not read before it is
# dropped (said once as a warning): well under WatchdogSec, so pings after it still go.
SEND_TIMEOUT = 5.0


class Notifier:
    """Talks to the service manager named by $NOTIFY_SOCKET (path or @abstract).

    The sd_notify protocol is one datagram per message on that socket. It is sent with
    Python's socket module, which lets go of the interpreter while it waits: the
    binding's sd_notify() holds the GIL through a blocking send, and a manager that
    does not read (its queue holds 10 datagrams by default) then froze every thread of
    the daemon. Messages go out in order from a thread of their own, so the main loop
    never waits on them; a STATUS= or WATCHDOG= not sent yet is replaced by the next.
    """

    def __init__(self) -> None:
        env = os.environ
        self.socket = env.get("NOTIFY_SOCKET") or None
        self.enabled = self.socket is not None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2 / 1e6  # ping at half the timeout
        self._cond = threading.Condition()
        self._outbox: list[tuple[str, ...]] = []
        self._sending = False
        self._thread: threading.Thread | None = None

    def send(self, *lines: str) -> None:
        """Queue one message; returns at once."""
        if not self.enabled:
            return
        with self._cond:
            key = lines[0].split("=", 1)[0] + "="
            if len(lines) == 1 and key in ("STATUS=", "WATCHDOG="):
                self._outbox = [m for m in self._outbox
                                if not (len(m) == 1 and m[0].startswith(key))]
            self._outbox.append(lines)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dedupd-notify",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait (bounded) until every queued message is sent: at stop, and for tests."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._outbox or self._sending), timeout)

    def _run(self) -> None:
        assert self.socket is not None
        address = "\0" + self.socket[1:] if self.socket.startswith("@") else self.socket
        sock: socket.socket | None = None
        failing = False
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outbox)
                lines, self._sending = self._outbox.pop(0), True
            try:
                if sock is None:  # connected: a send that waits sleeps (unconnected, the
                    # socket polls writable and sendto spins on EAGAIN at a whole core)
                    sock = socket.socket(socket.AF_UNIX,
                                         socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(SEND_TIMEOUT)
                    sock.connect(address)
                sock.send("\n".join(lines).encode())
                if failing:
                    log.info("sd_notify works again")
                failing = False
            except OSError as exc:  # not read, or the manager went away: keep running
                if not isinstance(exc, TimeoutError) and sock is not None:
                    sock.close()  # gone or replaced: connect afresh for the next one
                    sock = None
                if not failing:
                    log.warning("sd_notify failed (said once until it works again): %s",
                                exc or "timed out")
                failing = True
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing files in flight")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


class WatchdogPinger:
    """Sends WATCHDOG=1 every half-timeout, but only while `is_healthy()` says the pipeline
    makes progress: a wedged worker stops the pings and systemd restarts the service."""

    def __init__(self, notifier: Notifier, is_healthy: Callable[[], bool]) -> None:
        self.notifier, self.is_healthy = notifier, is_healthy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.notifier.watchdog_interval is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dedupd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            try:
                healthy = self.is_healthy()
            except Exception:  # a broken health check is an unhealthy service
                healthy = False
            if healthy:
                self.notifier.watchdog()
            else:
                log.warning("pipeline not making progress: withholding watchdog ping")
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


# ---------------------------------------------------------------- reload acknowledgement
#
# systemd 252 (Debian bookworm) has no Type=notify-reload: `systemctl reload` returns as
# soon as ExecReload= exits. So ExecReload= runs `dedupd reload`, which validates the file,
# sends SIGHUP to $MAINPID and waits for the daemon's answer in reload.json (in
# $RUNTIME_DIRECTORY, which both processes share), so a refused reload fails the command.

RELOAD_ACK = "reload.json"


def ack_directory() -> Path:
    """$RUNTIME_DIRECTORY under systemd (RuntimeDirectory=), else the state directory."""
    from dedupd.config import default_state_dir

    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return Path(runtime.split(":")[0]) if runtime else default_state_dir()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def write_reload_ack(ok: bool, message: str) -> None:
    """The daemon's answer to a SIGHUP: who, when (monotonic µs), whether it took."""
    directory = ack_directory()
    body = json.dumps({"pid": os.getpid(), "at_usec": monotonic_usec(), "ok": ok,
                       "message": message})
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{RELOAD_ACK}.{os.getpid()}"
        tmp.write_text(body + "\n", encoding="utf-8")
        os.replace(tmp, directory / RELOAD_ACK)
    except OSError as exc:  # `dedupd reload` then times out and says why it waited
        log.warning("cannot write the reload acknowledgement in %s: %s", directory, exc)


def read_ack(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None
