"""Is this path ours, and under which watch and policy: the one answer.

The watcher (which events to report), the daemon's intake and scanner (which files to
hash), and `scan`/`check` (which files a walk finds) all ask here, so a file the daemon
ignores is never indexed by a scan, and the other way round. Nothing here reads a file's
bytes or the store: names, the configuration, and for symlinks their targets.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate
from pathlib import Path, PurePosixPath

from dedupd.config import Config, Policy, Watch


@dataclass(frozen=True)
class Selected:
    """A path that is ours: the watch root it is under and the policy that governs it."""

    watch: Watch
    policy: Policy

    @property
    def scope(self) -> str:
        return self.watch.scope


def is_ignored(path: Path, root: Path, patterns: Iterable[str]) -> bool:
    """True if any component below the root matches an ignore pattern (temp files,
    dotfiles), or the path is not below the root at all."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return True
    pats = tuple(patterns)
    return any(fnmatchcase(part, pat) for part in parts for pat in pats)


@functools.lru_cache(maxsize=16)
def name_ignored(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """is_ignored for one name in a directory already known not to be ignored: every
    pattern in one compiled expression (a reconcile asks for every file it lists)."""
    return re.compile("|".join(map(translate, patterns)) or "(?!)").match


def wanted(policy: Policy, relative: str) -> bool:
    """Does the policy cover this path (relative to its watch root)?"""
    name = PurePosixPath(relative).name
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in policy.extensions:
        return False
    if not any(fnmatchcase(relative, pat) or fnmatchcase(name, pat) for pat in policy.include):
        return False
    return not any(fnmatchcase(relative, pat) or fnmatchcase(name, pat)
                   for pat in policy.exclude)


@functools.lru_cache(maxsize=64)
def wanted_test(policy: Policy) -> Callable[[str], bool]:
    """wanted() for one policy, as a test of relative paths; the common policy (every
    name with an image extension) becomes a set lookup: a reconcile asks for every file
    it lists."""
    if policy.include != ("*",) or policy.exclude:
        return functools.partial(wanted, policy)
    extensions = frozenset(policy.extensions)

    def by_extension(relative: str) -> bool:
        name = relative.rpartition("/")[2]
        return (name.rpartition(".")[2].lower() if "." in name else "") in extensions

    return by_extension


def select(config: Config, path: Path) -> Selected | None:
    """The watch and policy of a file under a root, or None if it is not ours: outside
    every root, below an ignored name, in a subdirectory of a non-recursive root, or
    not covered by its policy (extension, include, exclude)."""
    watch = config.watch_for(path)
    if watch is None or is_ignored(path, watch.path, config.ignore):
        return None
    if not watch.recursive and path.parent != watch.path:
        return None
    policy = config.policy_for(watch)
    if not wanted(policy, str(path.relative_to(watch.path))):
        return None
    return Selected(watch, policy)


def inside_roots(config: Config, path: Path) -> bool:
    """Is path one of the watch roots or below one?"""
    return any(path == w.path or w.path in path.parents for w in config.watches)


def symlink_allowed(config: Config, path: Path) -> bool:
    """A symlink is followed only with follow_symlinks on, and only to a target inside
    the watched roots (never out of them: that file is not ours to judge)."""
    return config.follow_symlinks and inside_roots(config, Path(os.path.realpath(path)))


def symlink_reason(config: Config, path: Path) -> str:
    """Why a symlink is not followed, in the words that fit it."""
    try:
        target = Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (not followed)"
        return "dangling symlink (its target does not exist)"
    if inside_roots(config, target):
        return "symlink to a file inside the watched roots, not followed " \
            "(follow_symlinks is off)"
    return "symlink pointing out of the watched roots (not followed)"


def walk(roots: Iterable[Path], config: Config) -> Iterator[Path]:
    """The files a scan or check looks at, in name order: under a watch root those
    select() takes; elsewhere those the default policy covers. Ignored names are
    neither listed nor entered, symlinks never followed. A root that is not a directory
    (a file named on the command line) is yielded as it is: hashed, or said why not."""
    ignored = name_ignored(config.ignore)
    default = wanted_test(config.policies["default"])
    for root in roots:
        if not root.is_dir():
            yield root
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not ignored(d))
            for name in sorted(filenames):
                if ignored(name):
                    continue
                path = Path(dirpath, name)
                if config.watch_for(path) is not None:
                    if select(config, path) is None:
                        continue
                elif not default(name):
                    continue
                if not path.is_symlink():
                    yield path
