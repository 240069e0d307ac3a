"""`dedupd reload` (ExecReload=): signal the running daemon and wait for its answer."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from dedupd.config import Config
from dedupd.service import RELOAD_ACK, ack_directory, monotonic_usec, read_ack


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    """ExecReload=: the config was loaded (and so validated) before this runs; signal the
    daemon and wait for its acknowledgement. 0 reloaded, 78 refused, 2 no answer."""
    pid = args.pid or int(os.environ.get("MAINPID") or 0)
    if pid <= 0:
        return _reload_error(args, "no daemon pid (give --pid, or run `systemctl reload dedupd`)")
    if not is_dedupd_daemon(pid):  # SIGHUP ends most processes: never send it to a stranger
        return _reload_error(args, f"pid {pid} is not a running `dedupd run`; nothing signalled")
    ack = ack_directory() / RELOAD_ACK
    sent = monotonic_usec()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _reload_error(args, f"cannot signal pid {pid}: {exc.strerror}")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        answer = read_ack(ack)
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
