"""What the service may write, and whose state a command touches.

Two deployment mistakes look alike from inside the daemon: a path its user has no write
permission on, and a path the unit's sandbox (ProtectSystem=strict + ReadWritePaths=)
mounts read-only. Both are checked at start and on reload and named in one line, with
what to do about each: the first needs permissions, the second a new drop-in and a
restart (a reload cannot change the mount namespace).

A command run as root against the service's state (the SQLite index, the quarantine)
would leave root-owned files the service cannot write: it acts as the state's owner
instead.
"""

from __future__ import annotations

import os
import pwd
import shlex
from pathlib import Path

from dedupd.config import Config, ConfigError
from dedupd.store import sqlite_file


def _why_unwritable(path: Path) -> str | None:
    """None if this process may create and rename entries in directory `path`."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return (f"{path} is read-only to the service: it is outside the unit's "
                    "ReadWritePaths= (run deploy/install.sh again, then "
                    "`systemctl restart dedupd`; a reload cannot grant write access)")
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not os.access(path, os.W_OK | os.X_OK):
        user = pwd.getpwuid(os.geteuid()).pw_name
        return (f"{path} is not writable by user {user} (grant it: "
                f"setfacl -m u:{user}:rwX -m d:u:{user}:rwX {shlex.quote(str(path))})")
    return None


def check_writable(config: Config) -> None:
    """Raise ConfigError naming the first directory the daemon must write and cannot:
    the quarantine and rejected directories (created if missing) and every root whose
    files may move."""
    needs: list[tuple[str, Path]] = []
    for key, directory in (("quarantine_dir", config.quarantine_dir),
                           ("rejected_dir", config.rejected_dir)):
        if directory is None:
            continue
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(config.source, key, f"cannot create {directory}: "
                              f"{exc.strerror or exc}") from None
        needs.append((key, directory))
    for i, watch in enumerate(config.watches):
        moves = config.policy_for(watch).action != "log" or config.rejected_dir is not None
        if moves and watch.path.is_dir():  # a missing root is the watcher's to report
            needs.append((f"watches[{i}].path", watch.path))
    for key, directory in needs:
        why = _why_unwritable(directory)
        if why:
            raise ConfigError(config.source, key, why)


def state_owner(config: Config) -> tuple[int, int] | None:
    """(uid, gid) owning the service's state: the SQLite index (or its directory), else
    the quarantine directory. None when it does not exist yet."""
    candidates = [config.quarantine_dir]
    file = sqlite_file(config.index)
    if file is not None:
        index = Path(file)
        candidates[:0] = [index, index.parent]
    for path in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        return st.st_uid, st.st_gid
    return None


def act_as_state_owner(config: Config) -> str | None:
    """Run as root on another user's state: become that user (its groups too), so
    every file this command creates belongs to the service. Returns the user's name
    when it switched."""
    if os.geteuid() != 0:
        return None
    owner = state_owner(config)
    if owner is None or owner[0] == 0:
        return None
    uid, gid = owner
    try:
        name = pwd.getpwuid(uid).pw_name
        os.initgroups(name, gid)
    except KeyError:  # no passwd entry (e.g. a DynamicUser=): no supplementary groups
        name = str(uid)
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return name
