"""The second look: what a dHash alone cannot tell, from the same reduced decode.

A 64-bit dHash within the threshold makes a *candidate*. Flat images, gradients and a
small blob on black leave most of the hash's 64 comparisons to ties, so unrelated images
of that kind hash alike. Three things computed from the grayscale image the hash was
made from (microseconds: it is already decoded and reduced) tell them apart:

- `trim_borders`: uniform bars (letterbox, padding) are cut before hashing, so a
  letterboxed copy hashes like its original (recipe version 2);
- `information`: how many of the hash's comparisons are decided by a real difference
  of brightness, not by a tie or noise; below `LOW_INFORMATION` the image is reported
  as `low_information` (its hash alone says little);
- a `Signature`: a 256-bit dHash of size 16 plus a 16x16 grayscale thumbnail of the
  picture's content (`content`), stored per image and read only for candidates;
  `confirms` says whether two images match. A candidate is a duplicate only if it does.

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
# correlation at least CORR_MIN (bench_quality measures both), for thresholds up to the
# default d = 4; looser for larger ones (`thresholds`).
H16_MAX, CORR_MIN = 32, 0.90
# The signature's content box: pixels off the ground by this share of the strongest
# contrast; a box larger than CONTENT_MAX_AREA of the image means "the whole image".
CONTENT_SHARE, CONTENT_MAX_AREA = 0.2, 0.6
# A thumbnail this flat (standard deviation in grey levels) carries no shape at all:
# such an image is a duplicate only of a byte-identical copy.
FLAT_STD = 2.0
BORDER_TOLERANCE = 12
# Bars are black or white (letterbox, padding): a bar's colour is below or above these.
BAR_DARK, BAR_LIGHT = 40, 215
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

    A side's bar colour is the median of its outermost line, near black or near white;
    lines whose every pixel is within `tolerance` of it are cut, up to the first line
    that is not, which must be a real edge (most of it off the bar colour). A direction is
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
        """Lines of a bar at this side: black or white, uniform, ending in a real edge
        (a line most of whose pixels differ from the bar, not a halo fading out)."""
        ref = int(np.median(lines[0]))
        if BAR_DARK < ref < BAR_LIGHT:
            return 0
        dev = np.abs(lines - ref)
        off = dev.max(axis=1) > tolerance
        if not off.any():
            return len(lines)
        edge = int(np.argmax(off))
        return edge if dev[edge].mean() > tolerance else 0

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


def content(gray: np.ndarray) -> np.ndarray:
    """The part of an image that holds its picture when that is a small object on a plain
    ground (a nebula on black sky, a text block on white): the bounding box, plus a
    margin, of pixels that stand out from the ground by a fifth of the strongest contrast
    (its 99.5th percentile). The whole image otherwise. A 16x16 thumbnail of the whole
    frame would show any two such images as "a blob in the middle" and call them alike.
    OpenCV calls throughout: tens of microseconds on a reduced image."""
    h, w = gray.shape[:2]
    ground = int(np.median(cv2.resize(gray, (min(w, 48), min(h, 48)),
                                      interpolation=cv2.INTER_AREA)))
    dev = cv2.absdiff(gray, np.full_like(gray, ground))
    counts = np.cumsum(cv2.calcHist([dev], [0], None, [256], [0, 256]).ravel())
    strongest = int(np.searchsorted(counts, 0.995 * counts[-1]))
    if strongest < 8:
        return gray
    _, mask = cv2.threshold(dev, CONTENT_SHARE * strongest, 255, cv2.THRESH_BINARY)
    x0, y0, bw, bh = cv2.boundingRect(mask)
    if bw * bh == 0:
        return gray
    my, mx = bh // 10 + 1, bw // 10 + 1
    y0, y1, x0, x1 = max(0, y0 - my), min(h, y0 + bh + my), max(0, x0 - mx), min(w, x0 + bw + mx)
    if (y1 - y0) * (x1 - x0) > CONTENT_MAX_AREA * h * w:
        return gray
    return gray[y0:y1, x0:x1]


def signature(gray: np.ndarray, grid: np.ndarray | None = None) -> Signature:
    """The signature of a (reduced, trimmed) grayscale image whose 64-bit hash came from
    the 9x8 `grid` (computed here when not given). The picture's content is reduced once
    to 32x32; the thumbnail and the 17x16 grid come from that."""
    if grid is None or grid.shape != (8, 9):
        grid = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
    body = cv2.resize(content(gray), (32, 32), interpolation=cv2.INTER_AREA)
    g17 = cv2.resize(body, (17, 16), interpolation=cv2.INTER_AREA)
    thumb = cv2.resize(body, (16, 16), interpolation=cv2.INTER_AREA)
    return Signature(grid_hash(g17), thumb.tobytes(), information(grid))


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


def thresholds(max_distance: int) -> tuple[int, float]:
    """(max 256-bit distance, min correlation) for a policy's 64-bit threshold: the
    defaults up to d = 4, looser beyond (a policy that accepts more different copies
    must not have them refused by the second look)."""
    return max(H16_MAX, 8 * max_distance), min(CORR_MIN, 1 - max_distance / 40)


def confirms(a: Signature, b: Signature, max_distance: int = 4) -> bool:
    """Do two candidates (64-bit dHashes within `max_distance`) show the same picture?
    A flat thumbnail has no shape to compare: never (only a byte-identical copy is)."""
    distance, corr, std = compare(a, b)
    h16_max, corr_min = thresholds(max_distance)
    return std >= FLAT_STD and distance <= h16_max and corr >= corr_min
