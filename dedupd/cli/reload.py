"""`dedupd reload` (ExecReload=): signal the running daemon and wait for its answer."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from dedupd.cli.output import (
    EXIT_CONFIG,
    EXIT_OK,
    CommandError,
    print_error,
    print_json,
    print_line,
)
from dedupd.config import Config
from dedupd.service import RELOAD_ACK, ack_directory, monotonic_usec, read_ack


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    """ExecReload=: the config was loaded (and so validated) before this runs; signal the
    daemon and wait for its acknowledgement. 0 reloaded, 78 refused, 2 no answer."""
    pid = args.pid or int(os.environ.get("MAINPID") or 0)
    if pid <= 0:
        raise _reload_error("no daemon pid (give --pid, or run `systemctl reload dedupd`)")
    if not is_dedupd_daemon(pid):  # SIGHUP ends most processes: never send it to a stranger
        raise _reload_error(f"pid {pid} is not a running `dedupd run`; nothing signalled")
    ack = ack_directory() / RELOAD_ACK
    sent = monotonic_usec()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise _reload_error(f"cannot signal pid {pid}: {exc.strerror}") from None
    answer = _wait_for_answer(pid, ack, sent, args.timeout)
    ok, message = bool(answer["ok"]), str(answer["message"])
    if args.json:
        print_json({"reloaded": ok, "message": message})
    elif ok:
        print_line(f"dedupd: {message}")
    else:
        print_error(message)
    return EXIT_OK if ok else EXIT_CONFIG


def _wait_for_answer(pid: int, ack: Path, sent: int, timeout: float) -> dict[str, object]:
    """The daemon's acknowledgement written after `sent` (monotonic µs), polled until
    timeout; an error if the daemon exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = read_ack(ack)
        if answer and answer.get("pid") == pid and int(answer.get("at_usec", 0)) > sent:
            return answer
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise _reload_error(f"the daemon (pid {pid}) exited") from None
        except PermissionError:
            pass
        time.sleep(0.05)  # polling a file the daemon replaces; the deadline bounds it
    raise _reload_error(f"no answer from pid {pid} in {timeout:g} s (expected in {ack})")


def is_dedupd_daemon(pid: int) -> bool:
    """Whether pid runs `dedupd ... run` (its command line, from /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and any(os.path.basename(a).startswith(b"dedupd") or a == b"dedupd.cli"
                                  for a in argv)


def _reload_error(message: str) -> CommandError:
    """Nothing reloaded: exit 2 with one line (a JSON object under --json)."""
    return CommandError("reload", f"reload: {message}")
