"""An image file before it is decoded: what format its first bytes say, the size its
header declares, whether it is cut short, and reading it whole, with every failure a
typed ImageError (a one-line reason, a stable kind for scripts).

Kept apart from hashing so that the review's thumbnails and the benches can read and
size files without the hash recipe, and so that hashing.py is the recipe alone.
"""

from __future__ import annotations

import os
import stat
import struct


class ImageError(Exception):
    """A file that cannot be hashed; ``kind`` is stable for scripts, ``reason`` is for people."""

    KINDS = (
        "empty", "truncated", "unsupported", "corrupt", "too_large", "unreadable",
        "vanished", "not_regular",
    )

    def __init__(self, kind: str, reason: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        """Picklable as (kind, reason): `scan` and `hash -j` send it back from workers."""
        return ImageError, (self.kind, self.reason)


FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")


def sniff_format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == 0xDA or length < 2:
            return None
        pos += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack_from(order + "H", data, ifd)
    found: dict[int, int] = {}
    for i in range(min(count, 512)):
        off = ifd + 2 + 12 * i
        if off + 12 > len(data):
            return None
        tag, typ, _n = struct.unpack_from(order + "HHI", data, off)
        if tag in (256, 257):
            fmt = "H" if typ == 3 else "I"
            (found[tag],) = struct.unpack_from(order + fmt, data, off + 8)
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def image_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, before any decoding (bomb check)."""
    try:
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "png":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack_from(">II", data, 16)
        if fmt == "webp":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack_from("<HH", data, 26)
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                (bits,) = struct.unpack_from("<I", data, 21)
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            return None
        if fmt == "bmp":
            (dib,) = struct.unpack_from("<I", data, 14)
            if dib == 12:
                return struct.unpack_from("<HH", data, 18)
            w, h = struct.unpack_from("<ii", data, 18)
            return abs(w), abs(h)
        if fmt == "tiff":
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def truncation_reason(data: bytes, fmt: str) -> str | None:
    """Why a file looks cut short, or None. Decoders happily return half an image."""
    if fmt == "jpeg":
        # "An EOI after the last SOS", searched from the end: the EOI is almost always the
        # last two bytes, so this reads a few bytes where a search for the last SOS (near
        # the start of a baseline JPEG) would scan the whole file.
        eoi = data.rfind(b"\xff\xd9")
        if eoi < 0 or data.find(b"\xff\xda", eoi) >= 0 or data.find(b"\xff\xda", 0, eoi) < 0:
            return "JPEG has no end-of-image marker after its last scan"
    elif fmt == "png":
        if b"IEND" not in data[-4096:]:
            return "PNG has no IEND chunk"
    elif fmt == "webp":
        (riff,) = struct.unpack_from("<I", data, 4)
        if len(data) < riff + 8:
            return f"WebP is {len(data)} bytes, its header says {riff + 8}"
    elif fmt == "bmp":
        (declared,) = struct.unpack_from("<I", data, 2)
        if declared and len(data) < declared:
            return f"BMP is {len(data)} bytes, its header says {declared}"
    return None  # TIFF: libtiff refuses missing strips at decode time


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """Read a regular file whole, mapping OS failures to ImageError kinds."""
    try:
        # O_NONBLOCK: opening a FIFO swapped in for the file must not block a worker.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError("vanished", "file disappeared before it could be read") from None
    except PermissionError:
        raise ImageError("unreadable", "permission denied") from None
    except OSError as exc:
        _refuse_special(path)  # a socket cannot be opened at all (ENXIO)
        raise ImageError("unreadable", exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not_regular", f"{file_kind(st.st_mode)}, not a regular file")
        # Ask for one byte more than fstat promised: getting exactly the promised size
        # means the end was reached, in one call. Anything else (the file grew or shrank,
        # a short read on a network filesystem) reads on until read() says end of file.
        data = os.read(fd, st.st_size + 1)
        if len(data) == st.st_size:
            return data
        chunks = [data]
        while chunk := os.read(fd, max(st.st_size, 1 << 16)):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ImageError("unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words for a log line."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a special file"


def _refuse_special(path: str | os.PathLike[str]) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ImageError("not_regular", f"{file_kind(mode)}, not a regular file") from None

