"""systemd service protocol (sd_notify through systemd-python): READY, STATUS, WATCHDOG,
RELOADING and STOPPING. Without NOTIFY_SOCKET every call is a no-op, so the same code
runs in a terminal, in tests and under systemd.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dedupd.service")


class Notifier:
    """Talks to the service manager named by $NOTIFY_SOCKET (path or @abstract).

    libsystemd reads the variables from the process environment, so this does too.
    """

    def __init__(self) -> None:
        env = os.environ
        self.socket = env.get("NOTIFY_SOCKET") or None
        self.enabled = self.socket is not None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2 / 1e6  # ping at half the timeout
        self._lock = threading.Lock()

    def send(self, *lines: str) -> None:
        if not self.enabled:
            return
        from systemd import daemon

        with self._lock:
            try:
                daemon.notify("\n".join(lines))
            except OSError as exc:  # the manager went away: keep running, say so once
                log.warning("sd_notify failed: %s", exc)

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


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def write_reload_ack(ok: bool, message: str) -> None:
    """The daemon's answer to a SIGHUP: who, when (monotonic µs), whether it took."""
    directory = ack_directory()
    body = json.dumps({"pid": os.getpid(), "at_usec": _monotonic_usec(), "ok": ok,
                       "message": message})
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{RELOAD_ACK}.{os.getpid()}"
        tmp.write_text(body + "\n", encoding="utf-8")
        os.replace(tmp, directory / RELOAD_ACK)
    except OSError as exc:  # `dedupd reload` then times out and says why it waited
        log.warning("cannot write the reload acknowledgement in %s: %s", directory, exc)


def _read_ack(path: Path) -> dict[str, object] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def cmd_reload(args: argparse.Namespace, config: object) -> int:
    """ExecReload=: the config was loaded (and so validated) before this runs; signal the
    daemon and wait for its acknowledgement. 0 reloaded, 78 refused, 2 no answer."""
    pid = args.pid or int(os.environ.get("MAINPID") or 0)
    if pid <= 0:
        return _reload_error(args, "no daemon pid (give --pid, or run `systemctl reload dedupd`)")
    if not is_dedupd_daemon(pid):  # SIGHUP ends most processes: never send it to a stranger
        return _reload_error(args, f"pid {pid} is not a running `dedupd run`; nothing signalled")
    ack = ack_directory() / RELOAD_ACK
    sent = _monotonic_usec()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _reload_error(args, f"cannot signal pid {pid}: {exc.strerror}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        answer = _read_ack(ack)
        if answer and answer.get("pid") == pid and int(answer.get("at_usec", 0)) > sent:
            out = {"reloaded": bool(answer["ok"]), "message": answer["message"]}
            if args.json:
                json.dump(out, sys.stdout)
                sys.stdout.write("\n")
            else:
                print(f"dedupd: {answer['message']}",
                      file=sys.stdout if answer["ok"] else sys.stderr)
            return 0 if answer["ok"] else 78
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return _reload_error(args, f"the daemon (pid {pid}) exited")
        except PermissionError:
            pass
        time.sleep(0.05)  # polling a file the daemon replaces; the deadline bounds it
    return _reload_error(args, f"no answer from pid {pid} in {args.timeout:g} s "
                         f"(expected in {ack})")


def is_dedupd_daemon(pid: int) -> bool:
    """Whether pid runs `dedupd ... run` (its command line, from /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and any(os.path.basename(a).startswith(b"dedupd") or a == b"dedupd.cli"
                                  for a in argv)


def _reload_error(args: argparse.Namespace, message: str) -> int:
    """One line on stderr, or a JSON object on stdout under --json; exit 2."""
    if getattr(args, "json", False):
        json.dump({"error": "reload", "message": message, "exit_status": 2}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"dedupd: reload: {message}", file=sys.stderr)
    return 2
