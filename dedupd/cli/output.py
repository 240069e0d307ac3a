"""What every command shares: exit statuses, the one-line error (a JSON object under
--json), JSON and text output with file names escaped, the progress bar. Commands print
through these helpers only, so that every output follows the same rules."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from dedupd.events import json_safe, printable

EXIT_OK, EXIT_DUPLICATE, EXIT_ERROR = 0, 1, 2
# sysexits.h EX_CONFIG: a configuration error is permanent, so the unit lists it in
# RestartPreventExitStatus= and the service ends `failed` instead of restarting forever.
EXIT_CONFIG = 78


class CommandError(Exception):
    """A command that cannot do what it was asked: main() says it in one line (a JSON
    object under --json) and exits with status."""

    def __init__(self, kind: str, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


class UsageError(CommandError):
    """Bad command line or input detected by a command; exit 2 with one line."""

    def __init__(self, message: str) -> None:
        super().__init__("usage", message)


def print_json(obj: Any) -> None:
    """One JSON document on one line of stdout; file names that are not UTF-8 escaped.
    Flushed: a long-running command (review) is read line by line while it runs."""
    sys.stdout.write(json.dumps(json_safe(obj)) + "\n")
    sys.stdout.flush()


def print_json_list(items: Iterable[Any]) -> None:
    """A JSON array on one line of stdout, written item by item: a list of 100k
    quarantine entries is never held in memory as one document."""
    write = sys.stdout.write
    write("[")
    for n, item in enumerate(items):
        write(("" if n == 0 else ", ") + json.dumps(json_safe(item)))
    write("]\n")
    sys.stdout.flush()


def fields_of(obj: Any) -> dict[str, Any]:
    """A dataclass (a journal entry, a record) as a JSON object: its fields, flat (no
    deep copy as dataclasses.asdict makes: listing 100k entries stays quick)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def print_result(as_json: bool, obj: Any, text: str) -> None:
    """A command's answer: obj as JSON under --json, else one line of text. Flushed, as
    print_json is."""
    if as_json:
        print_json(obj)
    else:
        print_line(text)
        sys.stdout.flush()


def print_line(line: str) -> None:
    """One line on stdout; file names in it escaped (a newline in a name stays inside)."""
    print(printable(line))


def print_note(line: str) -> None:
    """A line for the person at the terminal (counts, hints) on stderr, so that stdout
    stays the command's answer; names escaped."""
    print(printable(line), file=sys.stderr)


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

