"""The second look: what a dHash alone cannot tell, from the same reduced decode.

A 64-bit dHash within the threshold makes a *candidate*. Flat images, gradients and a
small blob on black leave most of the hash's 64 comparisons to ties, so unrelated images
of that kind hash alike. Three things computed from the grayscale image the hash was
made from (microseconds: it is already decoded and reduced) tell them apart:

- `trim_borders`: uniform bars (letterbox, padding) are cut before hashing, so a
  letterboxed copy hashes like its original (recipe version 2);
- `information`: how many of the hash's comparisons are decided by a real difference
  of brightness, not by a tie or noise; below `LOW_INFORMATION` the hash alone proves
  nothing;
- a `Signature`: a 256-bit dHash of size 16 plus a 16x16 grayscale thumbnail, stored
  per image and read only for candidates; `confirms` says whether two images match.

`VARIANTS` are the flips and rotations a newcomer can also be checked as.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

# Stored next to each signature; bump when the bytes change meaning.
SIGNATURE_VERSION = 1
# Comparisons of the 9x8 grid decided by at least STEP grey levels; fewer than
# LOW_INFORMATION such comparisons and the hash alone never makes a duplicate.
STEP = 2
LOW_INFORMATION = 16
# Confirming a candidate: the 256-bit dHash within H16_MAX bits and the thumbnails'
# correlation at least CORR_MIN; stricter for low-information images.
H16_MAX, CORR_MIN = 40, 0.90
LOW_H16_MAX, LOW_CORR_MIN = 24, 0.97
# A thumbnail this flat (standard deviation in grey levels) carries no shape at all:
# such an image is a duplicate only of a byte-identical copy.
FLAT_STD = 2.0
BORDER_TOLERANCE = 12
TRIM_SIDE = 512
# Signatures and flips are computed from the (trimmed) image reduced to this long side.
SIGNATURE_SIDE = 256

VARIANTS = ("identity", "hflip", "vflip", "rot180", "transpose", "rot90", "rot270",
            "antitranspose")


def variants(gray: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """The image and its 7 mirror images and rotations (views, no copies), named by the
    transform that turns the image into the variant (rot90 = 90 degrees clockwise)."""
    g = gray
    yield from zip(VARIANTS, (g, g[:, ::-1], g[::-1, :], g[::-1, ::-1], g.T, g.T[:, ::-1],
                              g.T[::-1, :], g[::-1, ::-1].T), strict=True)


# A variant matched the stored original: the newcomer is the original transformed by the
# inverse of the variant's transform (a newcomer rotated 90 clockwise matches as rot270).
INVERSE = {"identity": "identity", "hflip": "hflip", "vflip": "vflip", "rot180": "rot180",
           "transpose": "transpose", "rot90": "rot270", "rot270": "rot90",
           "antitranspose": "antitranspose"}


def trim_borders(gray: np.ndarray, tolerance: int = BORDER_TOLERANCE) -> np.ndarray:
    """Cut uniform bars (letterbox, padding) off every side of a grayscale image (a view).

    A side's bar colour is the median of its outermost line; lines whose every pixel is
    within `tolerance` of it are cut, up to the first line that is not. A direction is
    left whole when trimming would keep less than a quarter of it (flat images, a small
    blob on black: there the "border" is the picture). Large images are measured on an
    area-reduced copy (at most TRIM_SIDE pixels), so this costs microseconds at any size.
    """
    h, w = gray.shape[:2]
    if h < 8 or w < 8:
        return gray
    small = gray
    if max(h, w) > TRIM_SIDE:
        scale = TRIM_SIDE / max(h, w)
        small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    g = small.astype(np.int16)

    def run(lines: np.ndarray) -> int:
        ref = int(np.median(lines[0]))
        off = np.abs(lines - ref).max(axis=1) > tolerance
        return int(np.argmax(off)) if off.any() else len(lines)

    top, bottom = run(g), run(g[::-1])
    left, right = run(g.T), run(g.T[::-1])
    if sh - top - bottom < sh // 4:
        top = bottom = 0
    if sw - left - right < sw // 4:
        left = right = 0
    # Back to full size, rounding down: a reduced line that mixed bar and picture was
    # not cut, so no picture is lost.
    top, bottom = top * h // sh, bottom * h // sh
    left, right = left * w // sw, right * w // sw
    return gray[top:h - bottom, left:w - right]


def information(grid: np.ndarray, step: int = STEP) -> int:
    """How many of a dHash grid's neighbour comparisons differ by at least `step` levels."""
    g = grid.astype(np.int16)
    return int((np.abs(g[:, 1:] - g[:, :-1]) >= step).sum())


@dataclass(frozen=True)
class Signature:
    """The confirming signature of one image (SIGNATURE_BYTES bytes when stored)."""

    h16: bytes  # 256-bit dHash of size 16, dedupd's bit order (32 bytes)
    thumb: bytes  # 16x16 grayscale thumbnail, row-major (256 bytes)
    info: int  # information of the 9x8 grid the 64-bit hash came from

    def to_bytes(self) -> bytes:
        return bytes([SIGNATURE_VERSION, min(self.info, 255)]) + self.h16 + self.thumb

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature | None:
        """None for a signature of another version (or none): no second look possible."""
        if len(data) != SIGNATURE_BYTES or data[0] != SIGNATURE_VERSION:
            return None
        return cls(h16=data[2:34], thumb=data[34:], info=data[1])

    @property
    def low_information(self) -> bool:
        return self.info < LOW_INFORMATION


SIGNATURE_BYTES = 2 + 32 + 256


def grid_hash(grid: np.ndarray) -> bytes:
    """dHash bits of a (size, size+1) grid: set where the right neighbour is brighter."""
    bits = grid[:, 1:] > grid[:, :-1]
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def reduce(gray: np.ndarray, side: int = SIGNATURE_SIDE) -> np.ndarray:
    """The image with its long side at most `side` pixels (area resize; as is if smaller)."""
    h, w = gray.shape[:2]
    if max(h, w) <= side:
        return gray
    scale = side / max(h, w)
    return cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def signature(gray: np.ndarray) -> Signature:
    """The signature of a (reduced, trimmed) grayscale image: three small area resizes."""
    g9 = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
    g17 = cv2.resize(gray, (17, 16), interpolation=cv2.INTER_AREA)
    thumb = cv2.resize(gray, (16, 16), interpolation=cv2.INTER_AREA)
    return Signature(grid_hash(g17), np.ascontiguousarray(thumb).tobytes(), information(g9))


def _zscore(thumb: bytes) -> tuple[np.ndarray, float]:
    t = np.frombuffer(thumb, np.uint8).astype(np.float32)
    std = float(t.std())
    return (t - t.mean()) / max(std, 1e-6), std


def compare(a: Signature, b: Signature) -> tuple[int, float, float]:
    """(256-bit distance, thumbnail correlation, the flatter thumbnail's std)."""
    ha = np.frombuffer(a.h16, np.uint8)
    hb = np.frombuffer(b.h16, np.uint8)
    distance = int(np.unpackbits(ha ^ hb).sum())
    za, sa = _zscore(a.thumb)
    zb, sb = _zscore(b.thumb)
    return distance, float((za * zb).mean()), min(sa, sb)


def confirms(a: Signature, b: Signature) -> bool:
    """Do two candidates (64-bit dHashes within the threshold) show the same picture?"""
    distance, corr, std = compare(a, b)
    if a.low_information or b.low_information:
        return std >= FLAT_STD and distance <= LOW_H16_MAX and corr >= LOW_CORR_MIN
    return distance <= H16_MAX and corr >= CORR_MIN
