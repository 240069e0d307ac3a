"""Perceptual difference hash (dHash) of image files and bytes.

This module knows images, not policy: it turns bytes into a hash plus the facts
needed to trust it (size, digest), or into a typed ImageError saying why not.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from dedupd.signature import INVERSE, Signature, reduce, signature, trim_borders, variants

# Bump when anything that changes hash bits changes (decoder choice, resize, bit order).
# 2: uniform borders (letterbox bars, padding) are trimmed before hashing. Version 1
# stays selectable (`hash.version: 1`) for dictionaries not yet re-hashed.
PIPELINE_VERSION = 2
VERSIONS = (1, 2)
ALGOS = ("dhash", "dhash-seed")
DECODES = ("fast", "full")
SIZES = (8, 16)
DEFAULT_MAX_PIXELS = 200_000_000
FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")

# OpenCV prints libjpeg warnings ("Premature end of JPEG file") itself; we report
# truncation through our own checks instead.
if hasattr(cv2, "setLogLevel"):
    cv2.setLogLevel(0)


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


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the bits; hashes of different recipes are never compared."""

    algo: str = "dhash"
    size: int = 8
    decode: str = "fast"
    version: int = PIPELINE_VERSION

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r} (choose from {', '.join(ALGOS)})")
        if self.size not in SIZES:
            raise ValueError(f"unsupported hash size {self.size} (choose from 8, 16)")
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r} (choose fast or full)")
        if self.version not in VERSIONS:
            raise ValueError(f"unknown recipe version {self.version} (choose 1 or 2)")
        if self.algo == "dhash-seed":
            # The seed recipe is a full colour decode with nothing trimmed, by definition.
            object.__setattr__(self, "decode", "full")
            object.__setattr__(self, "version", 1)

    @property
    def resize(self) -> str:
        return "linear" if self.algo == "dhash-seed" else "area"

    @property
    def bits(self) -> int:
        return self.size * self.size

    @property
    def key(self) -> str:
        """Stable identifier stored next to every hash, e.g. ``dhash:8:fast:area:v2``."""
        return f"{self.algo}:{self.size}:{self.decode}:{self.resize}:v{self.version}"

    @property
    def trims(self) -> bool:
        """Uniform borders are cut before hashing (version 2 on)."""
        return self.version >= 2

    @classmethod
    def from_key(cls, key: str) -> Recipe:
        algo, size, decode, _resize, version = key.split(":")
        return cls(algo=algo, size=int(size), decode=decode, version=int(version[1:]))


@dataclass(frozen=True)
class ImageHash:
    """The result of hashing one image."""

    hash: int
    recipe: Recipe
    width: int
    height: int
    # SHA-256 of the file bytes (hardware-accelerated on current CPUs: 2.5x faster than
    # BLAKE2b here): byte-identical copies match with no threshold. None
    # when the caller asked for no digest (`dedupd hash` prints none: it costs as much as
    # a sixth of a reduced decode).
    digest: str | None
    file_size: int
    format: str
    # What libjpeg/libpng/libtiff said while decoding (e.g. "Corrupt JPEG data: 1153
    # extraneous bytes before marker 0xd9"). Such an image is hashed anyway, on purpose:
    # the decoder recovered a full image; callers log the warning with the file's name.
    warnings: tuple[str, ...] = ()
    # The second look (dedupd.signature): None only when the caller asked for none.
    signature: Signature | None = field(default=None, compare=False)
    # The (trimmed) grayscale image the hash was made from, for flips and rotations.
    gray: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def hex(self) -> str:
        return hash_to_hex(self.hash, self.recipe.size)

    @property
    def low_information(self) -> bool:
        return self.signature is not None and self.signature.low_information

    def variants(self) -> Iterator[tuple[str, int, Callable[[], Signature]]]:
        """The image's 7 mirror images and rotations as (transform, hash, sign): the
        transform names how a stored original that matches a variant became this image;
        sign() makes the variant's signature, needed only when the variant has candidates
        (most of a variant's cost)."""
        if self.gray is None:
            return
        interpolation = cv2.INTER_LINEAR if self.recipe.resize == "linear" else cv2.INTER_AREA
        for name, view in variants(self.gray):
            if name != "identity":
                view = np.ascontiguousarray(view)
                size = self.recipe.size
                grid = cv2.resize(view, (size + 1, size), interpolation=interpolation)
                yield INVERSE[name], grid_bits(grid), functools.partial(signature, view, grid)


# ---------------------------------------------------------------- hash values


def hash_to_hex(value: int, size: int = 8) -> str:
    """Lowercase hex, zero-padded to size*size/4 digits."""
    return format(value, f"0{size * size // 4}x")


def hex_to_hash(text: str) -> int:
    return int(text, 16)


def hash_to_bytes(value: int, size: int = 8) -> bytes:
    """Little-endian bytes: word 0 holds bits 0..63, so numpy can view it as uint64 words."""
    return value.to_bytes(size * size // 8, "little")


def bytes_to_hash(data: bytes) -> int:
    return int.from_bytes(data, "little")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def dhash_bits(gray: np.ndarray, size: int = 8, interpolation: int = cv2.INTER_AREA) -> int:
    """dHash of a grayscale image: bit i = element i of the flattened row-major grid
    `small[:, 1:] > small[:, :-1]`, i.e. set where a pixel's right neighbour is brighter.
    That is the seed's (and imagehash's) orientation; dictionaries built with the seed
    depend on it, so it is kept even where prose says "left brighter than right"."""
    return grid_bits(cv2.resize(gray, (size + 1, size), interpolation=interpolation))


def grid_bits(small: np.ndarray) -> int:
    """The dHash of an already resized (size, size+1) grid."""
    grid = small[:, 1:] > small[:, :-1]
    packed = np.packbits(grid.ravel(), bitorder="little")
    return int.from_bytes(packed.tobytes(), "little")


# ---------------------------------------------------------------- headers


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


# ---------------------------------------------------------------- decoding

_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
            (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def decode_flag(fmt: str, width: int, height: int, recipe: Recipe) -> int:
    """The cheapest decode that still leaves >= 8 source pixels per hash cell each way.

    Only JPEG gets a reduced decode: libjpeg scales in the DCT domain, so 1/8 costs
    a fraction of a full decode. Other formats decode fully and OpenCV would just
    resize afterwards.
    """
    if recipe.decode == "full" or fmt != "jpeg":
        return cv2.IMREAD_GRAYSCALE
    short_side = min(width, height)
    for factor, flag in _REDUCED:
        if short_side // factor >= 8 * (recipe.size + 1):
            return flag
    return cv2.IMREAD_GRAYSCALE


def hash_bytes(
    data: bytes, recipe: Recipe = Recipe(), max_pixels: int = DEFAULT_MAX_PIXELS,
    *, digest: bool = True, second_look: bool = True,
) -> ImageHash:
    """Hash an image held in memory; raises ImageError for anything that isn't one.
    `second_look` adds the confirming signature (`dedupd hash` prints none)."""
    if not data:
        raise ImageError("empty", "file is empty (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageError("unsupported", "not a JPEG, PNG, WebP, BMP or TIFF image")
    dims = image_size(data, fmt)
    if dims is None:
        if len(data) < 64:
            raise ImageError("truncated", f"{fmt.upper()} header is cut short")
        raise ImageError("corrupt", f"{fmt.upper()} header is unreadable")
    width, height = int(dims[0]), int(dims[1])
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"{fmt.upper()} header declares {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"header declares {width}x{height} = {width * height / 1e6:.0f} MP, "
            f"over the {max_pixels / 1e6:.0f} MP limit (decompression bomb?)",
        )
    cut = truncation_reason(data, fmt)
    if cut:
        raise ImageError("truncated", cut)
    buf = np.frombuffer(data, np.uint8)
    if recipe.algo == "dhash-seed":
        colour, said = DECODER_MESSAGES.decode(lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR))
        if colour is None:
            raise ImageError("corrupt", _undecodable(fmt, said))
        gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    else:
        flag = decode_flag(fmt, width, height, recipe)
        gray, said = DECODER_MESSAGES.decode(lambda: cv2.imdecode(buf, flag))
        if gray is None:
            raise ImageError("corrupt", _undecodable(fmt, said))
    value, sig, small = hash_gray(gray, recipe, second_look=second_look)
    sha = hashlib.sha256(data).hexdigest() if digest else None
    return ImageHash(value, recipe, width, height, sha, len(data), fmt, said, sig, small)


def hash_gray(gray: np.ndarray, recipe: Recipe = Recipe(), *, second_look: bool = True
              ) -> tuple[int, Signature | None, np.ndarray | None]:
    """(hash, signature, reduced image) of an image already decoded as `recipe` decodes
    it (decode_flag): everything after the decoder, so bench_quality can measure this
    exact code on decodes it keeps."""
    if recipe.trims:
        gray = trim_borders(gray)
    interpolation = cv2.INTER_LINEAR if recipe.resize == "linear" else cv2.INTER_AREA
    grid = cv2.resize(gray, (recipe.size + 1, recipe.size), interpolation=interpolation)
    value = grid_bits(grid)
    if not second_look:
        return value, None, None
    small = reduce(gray)
    return value, signature(small, grid), small


def _undecodable(fmt: str, said: tuple[str, ...]) -> str:
    return f"{fmt.upper()} data could not be decoded" + (f" ({said[0]})" if said else "")


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


def hash_file(
    path: str | os.PathLike[str], recipe: Recipe = Recipe(), max_pixels: int = DEFAULT_MAX_PIXELS,
    *, digest: bool = True, second_look: bool = True,
) -> ImageHash:
    """Hash an image file; raises ImageError with a one-line reason on bad input."""
    return hash_bytes(read_image_file(path), recipe, max_pixels, digest=digest,
                      second_look=second_look)
