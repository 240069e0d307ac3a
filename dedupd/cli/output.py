"""What every command shares: exit statuses, the one-line error (a JSON object under
--json), JSON and text output with file names escaped, the progress bar."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from dedupd.events import json_safe, printable

EXIT_OK, EXIT_DUPLICATE, EXIT_ERROR = 0, 1, 2
# sysexits.h EX_CONFIG: a configuration error is permanent, so the unit lists it in
# RestartPreventExitStatus= and the service ends `failed` instead of restarting forever.
EXIT_CONFIG = 78


class UsageError(Exception):
    """Bad command line or input detected by a command; exit 2 with one line."""


def print_json(obj: Any) -> None:
    json.dump(json_safe(obj), sys.stdout, indent=None, sort_keys=False)
    sys.stdout.write("\n")


def print_line(line: str) -> None:
    """One line on stdout; file names in it escaped (a newline in a name stays inside)."""
    print(printable(line))


def print_error(message: str) -> None:
    print(f"dedupd: {printable(message)}", file=sys.stderr)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None = None) -> None:
        self.total, self.label, self.done = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done == self.total):
            self.last = now
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                             f"{rate:,.0f}/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def fail(as_json: bool, kind: str, message: str, status: int) -> int:
    """An error as one line: on stderr, or under --json as a JSON object on stdout (where a
    script reading the command's JSON looks)."""
    if as_json:
        print_json({"error": kind, "message": message, "exit_status": status})
    else:
        print_error(message)
    return status

