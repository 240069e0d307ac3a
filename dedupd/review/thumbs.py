"""Thumbnails for the review page, made server-side from the files and cached on disk.

A thumbnail is keyed by the file's path, size, mtime and inode, so an edited or replaced
file gets a new one and a stale one is never shown. Only regular files are read (never
through a symlink), and a header declaring more than the configured pixel limit is
refused before decoding, as when hashing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import cv2
import numpy as np

from dedupd.imagefile import image_size, read_image_file, sniff_format

log = logging.getLogger("dedupd.review")

THUMB_SIZE = 240  # longest side, pixels
_REDUCED_COLOR = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


class ThumbnailError(Exception):
    """No thumbnail can be made of this file (gone, not regular, not an image)."""


def default_cache_dir() -> Path:
    """$CACHE_DIRECTORY (systemd), else $XDG_CACHE_HOME or ~/.cache, + dedupd/thumbnails."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "thumbnails"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "dedupd" / "thumbnails"


def make_thumbnail(path: str, max_pixels: int, size: int = THUMB_SIZE) -> bytes:
    """JPEG bytes of path scaled to fit size x size (JPEGs decode reduced, in the DCT)."""
    data = read_image_file(path)
    fmt = sniff_format(data[:16])
    dims = image_size(data, fmt) if fmt else None
    if fmt is None or dims is None:
        raise ThumbnailError("not an image dedupd can read")
    width, height = int(dims[0]), int(dims[1])
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise ThumbnailError(f"header declares {width}x{height} pixels")
    flag = cv2.IMREAD_COLOR
    if fmt == "jpeg":
        for factor, reduced in _REDUCED_COLOR:
            if max(width, height) // factor >= size:
                flag = reduced
                break
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None:
        raise ThumbnailError("could not be decoded")
    h, w = image.shape[:2]
    scale = min(1.0, size / max(w, h))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - encoding a decoded image does not fail
        raise ThumbnailError("could not be encoded")
    return buf.tobytes()


class ThumbnailCache:
    """make_thumbnail, remembered in a directory (or nowhere if it cannot be written)."""

    def __init__(self, directory: Path | None, max_pixels: int) -> None:
        self.directory = directory
        self.max_pixels = max_pixels
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                log.warning("thumbnail cache %s unusable (%s); thumbnails are not cached",
                            directory, exc.strerror or exc)
                self.directory = None

    def get(self, path: str) -> bytes:
        """The thumbnail of path; ThumbnailError if there is none to show."""
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise ThumbnailError(exc.strerror or str(exc)) from None
        if not stat.S_ISREG(st.st_mode):  # a symlink or a FIFO planted in its place
            raise ThumbnailError("not a regular file")
        key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
                             .encode("utf-8", "surrogateescape")).hexdigest()
        cached = self.directory / f"{key}.jpg" if self.directory is not None else None
        if cached is not None:
            try:
                return cached.read_bytes()
            except OSError:
                pass
        try:
            thumb = make_thumbnail(path, self.max_pixels)
        except ThumbnailError:
            raise
        except Exception as exc:  # ImageError and OS errors: one line, no traceback
            raise ThumbnailError(str(exc)) from None
        if cached is not None:
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
            try:
                tmp.write_bytes(thumb)
                os.replace(tmp, cached)
            except OSError as exc:
                log.debug("cannot cache a thumbnail in %s: %s", self.directory, exc)
                tmp.unlink(missing_ok=True)
        return thumb
