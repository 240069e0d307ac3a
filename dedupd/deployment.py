"""What deploy/install.sh needs to know from the configuration, and whether the service's
user can do its work there. Run by the installer: ``python -m dedupd.deployment facts
CONFIG`` (as root) and ``... check CONFIG`` (as the dedupd user).

Placement: the unit makes the whole file system read-only (ProtectSystem=strict) and
bind-mounts each ReadWritePaths= entry on its own, so a rename between two entries fails
with EXDEV even on one file system, and every quarantine would become a copy. The unit is
therefore given ONE directory holding every root, the quarantine and the rejected
directory: moves between them stay atomic renames that keep the inode and owner. That
directory must not be a system one (/, /srv, /var/lib...): writable by the service, it
would be its whole world.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import sys
from pathlib import Path

from dedupd.config import Config, ConfigError, load_config
from dedupd.store import sqlite_file

# Too broad to hand to the service as its writable tree.
SYSTEM_DIRS = frozenset((
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
    "/usr/local", "/var", "/var/lib", "/var/tmp", "/var/cache", "/var/log", "/var/spool",
    "/var/mail"))
# How many unusable paths `check` lists before it only counts them.
SHOWN = 8


class PlacementError(Exception):
    """The configured paths cannot be granted to the unit as one tree."""


def writable_paths(config: Config) -> list[Path]:
    """Every directory the daemon moves files into or out of."""
    paths = [w.path for w in config.watches] + [config.quarantine_dir]
    if config.rejected_dir is not None:
        paths.append(config.rejected_dir)
    return paths


def common_parent(config: Config) -> Path:
    """The one directory the unit makes writable: the deepest holding every root and the
    quarantine (and rejected) directory. Raises PlacementError when that is a system
    directory, saying what to configure instead."""
    parent = Path(os.path.commonpath([str(p) for p in writable_paths(config)]))
    if str(parent) in SYSTEM_DIRS:
        raise PlacementError(
            f"the roots and quarantine_dir in {config.source} share no directory but "
            f"{parent}, too broad to make writable for the service; put them under one "
            "directory of their own on one file system (e.g. roots /srv/dedupd/datasets/..., "
            "quarantine_dir: /srv/dedupd/quarantine) so duplicates move by atomic rename")
    return parent


def dirs_under_roots(config: Config) -> int:
    """inotify needs one watch per directory."""
    count = 0
    for w in config.watches:
        for _dirpath, dirnames, _files in os.walk(w.path):
            count += 1
            if not w.recursive:
                dirnames.clear()
    return count


def facts(config: Config) -> dict[str, str]:
    """key=value lines for the installer."""
    parent = common_parent(config)
    devices = set()
    for p in writable_paths(config):
        with contextlib.suppress(OSError):  # a missing path: `check` reports it
            devices.add(p.stat().st_dev)
    network = sqlite_file(config.index) is None
    extra = [str(p) for p in (config.quarantine_dir, config.rejected_dir) if p is not None]
    metrics = getattr(config, "metrics", None)
    listen = metrics.listen if metrics is not None else None
    textfile = metrics.textfile if metrics is not None else None
    loopback = listen is not None and listen[0] in ("127.0.0.1", "::1", "localhost")
    return {
        "parent": str(parent),
        # Prometheus: the textfile's directory is written too; an HTTP endpoint needs IP.
        "textfile_dir": str(textfile.parent) if textfile is not None else "",
        "listen": "no" if listen is None else "loopback" if loopback else "any",
        "home": "yes" if str(parent).startswith(("/home/", "/root/")) else "no",
        "network": "yes" if network else "no",
        "dirs": str(dirs_under_roots(config)),
        "one_fs": "yes" if len(devices) <= 1 else "no",
        "state_dirs": " ".join(extra),
    }


def problems(config: Config) -> list[tuple[Path, str, str]]:
    """As the service's user: (path, what is wrong, the command that fixes it)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    grant = f"setfacl -R -m u:{user}:rwX -m d:u:{user}:rwX"
    found: list[tuple[Path, str, str]] = []
    for watch in config.watches:
        root, q = watch.path, shlex.quote(str(watch.path))
        for ancestor in reversed(root.parents):
            if ancestor.is_dir() and not os.access(ancestor, os.X_OK):
                enter = f"setfacl -m u:{user}:x {shlex.quote(str(ancestor))}"
                found.append((ancestor, "cannot enter it", enter))
        if not root.exists():
            found.append((root, "does not exist", f"mkdir -p {q} && {grant} {q}"))
            continue
        unlistable: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable.append):
            if not os.access(dirpath, os.R_OK | os.W_OK | os.X_OK):
                found.append((Path(dirpath), "cannot write it (duplicates move out of it)",
                              f"{grant} {q}"))
            for name in filenames:
                path = Path(dirpath, name)
                if not path.is_symlink() and not os.access(path, os.R_OK):
                    found.append((path, "cannot read it", f"{grant} {q}"))
            if not watch.recursive:
                dirnames.clear()
        found += [(Path(str(e.filename)), f"cannot list it ({e.strerror})", f"{grant} {q}")
                  for e in unlistable]
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("facts", "check"):
        print("usage: python -m dedupd.deployment facts|check CONFIG", file=sys.stderr)
        return 2
    try:
        config = load_config(argv[1])
        if argv[0] == "facts":
            for key, value in facts(config).items():
                print(f"{key}={value}")
            return 0
    except (ConfigError, PlacementError) as exc:
        print(f"install.sh: {exc}", file=sys.stderr)
        return 78 if isinstance(exc, ConfigError) else 1
    found = problems(config)
    for path, why, _fix in found[:SHOWN]:
        print(f"  {shlex.quote(str(path))}: {why}")
    if len(found) > SHOWN:
        print(f"  ... and {len(found) - SHOWN} more")
    fixes = list(dict.fromkeys(fix for _path, _why, fix in found))
    if fixes:
        print("run, as root:")
        for fix in fixes:
            print(f"  {fix}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
