"""The daemon as a real subprocess, plus polling helpers with deadlines (no sleeps as sync)."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll until predicate() is truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write_config(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


# The logs of the daemons the running test started: a failing test shows their tails.
STARTED_LOGS: list[Path] = []


class DaemonProcess:
    """`dedupd --config CFG run` with its log captured to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, log_mode: str = "stderr") -> None:
        """prefix: a command the daemon runs under (e.g. setpriv dropping capabilities);
        log_mode: its --log (stderr or json: both land in `log`)."""
        self.config, self.log_path, self.log_mode = config, log, log_mode
        self.env = {**os.environ, **(env or {})}
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        STARTED_LOGS.append(log)

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._fh = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "dedupd", "--config", str(self.config),
             "--log", self.log_mode, "run"], stdout=self._fh, stderr=self._fh, env=self.env)
        started = '"event": "started"' if self.log_mode == "json" else "started:"
        if wait_ready:
            wait_for(lambda: started in self.log_since_start() or self.proc.poll() is not None,
                     60, "the daemon to start")
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        return self.log()[self._log_offset:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._fh.close()
        return code


def records(db: Path) -> dict[str, str]:
    """path -> status, read straight from the daemon's SQLite file."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT path, status FROM images"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".json")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
