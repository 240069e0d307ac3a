"""Perceptual difference hash (dHash) of image files and bytes.

This module knows images, not policy: it turns bytes into a hash plus the facts
needed to trust it (size, digest), or into a typed ImageError saying why not.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from dedupd.decoder_messages import DECODER_MESSAGES
from dedupd.imagefile import (
    ImageError,
    image_size,
    read_image_file,
    sniff_format,
    truncation_reason,
)
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

# OpenCV prints libjpeg warnings ("Premature end of JPEG file") itself; we report
# truncation through our own checks instead.
if hasattr(cv2, "setLogLevel"):
    cv2.setLogLevel(0)




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












def hash_file(
    path: str | os.PathLike[str], recipe: Recipe = Recipe(), max_pixels: int = DEFAULT_MAX_PIXELS,
    *, digest: bool = True, second_look: bool = True,
) -> ImageHash:
    """Hash an image file; raises ImageError with a one-line reason on bad input."""
    return hash_bytes(read_image_file(path), recipe, max_pixels, digest=digest,
                      second_look=second_look)
