"""Capture of what the C image decoders print on file descriptor 2 themselves, per file.

Its own module because it is process plumbing (a memfd, fd 2, a condition), not the
hash recipe; hashing.py decodes under it and the CLI turns it on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np


class DecoderMessages:
    """Per-file capture of what the C decoders write to file descriptor 2 themselves.

    libjpeg, libpng and libtiff print warnings straight to fd 2: raw lines without a
    path, which break `--log json` and split human lines. While decodes run, fd 2 points
    at a memfd; between them it is the real stderr again, so what other C code says
    then (libpq notices, glibc's last words) goes out as before. Python's sys.stderr,
    and so every dedupd log line, writes to a copy of the real stderr throughout.

    Decodes run in parallel, sharing the memfd; a decoder writes synchronously, so a
    decode that finds the memfd empty afterwards said nothing. One that finds it
    non-empty cannot tell whose words they are: it decodes again alone (no other decode
    running, new ones wait), with the memfd emptied first, and takes what that run said
    and its first run said too (decoders say the same words for the same bytes; a line
    new in the second run was written meanwhile by other code). The lines that no
    repeated decode claims were not a decoder's: they go to the real stderr when the
    last decode ends, as does anything else left in the memfd then.

    Off until a program turns it on (the CLI does): a library caller keeps its fd 2.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._real: int | None = None  # the real stderr, once captured
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._running = 0  # shared decodes in flight
        self._alone = False  # an exclusive decode holds the memfd
        self._waiting = 0  # decodes that heard words, waiting to decode again alone
        self._unclaimed: list[bytes] = []  # lines emptied out that no decode claimed yet
        self._memfd: int | None = None
        self._offset = 0  # read up to here: the memfd is only emptied while not fd 2

    def _after_fork(self) -> None:
        """A forked pool worker captures into its own memfd, not its parent's."""
        memfd = self._memfd
        self._reset()
        if memfd is not None:
            os.close(memfd)
        if self._real is not None:
            os.dup2(self._real, 2)  # the fork may have come mid-decode

    def _begin(self) -> None:
        """The first decode of a group (under the lock): fd 2 -> the memfd."""
        if self._memfd is None:
            if self._real is None:
                self._real = os.dup(2)
                sys.stderr.flush()
                sys.stderr = open(self._real, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                  errors="backslashreplace", closefd=False)
            self._memfd = os.memfd_create("dedupd-decoder-messages", os.MFD_CLOEXEC)
            flags = fcntl.fcntl(self._memfd, fcntl.F_GETFL)
            fcntl.fcntl(self._memfd, fcntl.F_SETFL, flags | os.O_APPEND)
        elif self._offset:  # fd 2 is not the memfd now: nobody writes to it
            os.ftruncate(self._memfd, 0)
            self._offset = 0
        os.dup2(self._memfd, 2)

    def _end(self) -> None:
        """The last decode of a group ended (under the lock): fd 2 is the real stderr
        again, and what no decoder claimed goes there."""
        assert self._memfd is not None and self._real is not None
        os.dup2(self._real, 2)
        leftover = b"".join(self._unclaimed) + self._take()
        self._unclaimed = []
        with contextlib.suppress(OSError):  # stderr gone: nothing else to tell it to
            while leftover:
                leftover = leftover[os.write(self._real, leftover):]

    def _said(self) -> bool:
        assert self._memfd is not None
        return os.fstat(self._memfd).st_size > self._offset

    def _take(self) -> bytes:
        """What was written since the last take. Read on from an offset, not emptied:
        other code may be writing at this moment, and truncating would lose its words."""
        assert self._memfd is not None
        size = os.fstat(self._memfd).st_size
        raw = os.pread(self._memfd, size - self._offset, self._offset) \
            if size > self._offset else b""
        self._offset += len(raw)
        return raw

    def decode(self, run: Callable[[], np.ndarray | None]) -> tuple[np.ndarray | None,
                                                                   tuple[str, ...]]:
        """run() (an imdecode) and what the decoder wrote to fd 2 meanwhile."""
        if not self.enabled:
            return run(), ()
        with self._shared():
            image = run()
            if not self._said():
                return image, ()
            with self._cond:  # still running: nobody empties the memfd before we queue
                self._waiting += 1
        with self._exclusive():
            self._unclaimed += self._take().splitlines(keepends=True)  # maybe ours
            image = run()
            own, foreign = [], []
            for line in self._take().splitlines(keepends=True):
                if line in self._unclaimed:  # said in its first run too: the decoder's
                    self._unclaimed.remove(line)
                    own.append(line)
                else:  # written meanwhile by other code
                    foreign.append(line)
            self._unclaimed += foreign
            text = b"".join(own)[: 1 << 16].decode("utf-8", "backslashreplace")
            return image, tuple(" ".join(line.split()) for line in text.splitlines()
                                if line.strip())

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            if not self._running:
                self._begin()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not (self._running or self._waiting or self._alone):
                    self._end()
                self._cond.notify_all()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._alone or self._running:
                self._cond.wait()
            self._alone = True
            self._waiting -= 1
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                if not self._waiting:
                    self._end()
                self._cond.notify_all()


DECODER_MESSAGES = DecoderMessages()

