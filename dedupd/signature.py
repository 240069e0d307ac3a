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
  picture's content (`content`) with its level, contrast and place in the frame, stored
  per image and read only for candidates; `confirms` (one pair) and `accepts` (any
  number, for bench_quality) say whether two images match. A candidate is a duplicate
  only if they do; candidates are looked up within `search_radius`.

`VARIANTS` are the flips and rotations a newcomer can also be checked as.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

# Stored next to each signature; bump when the bytes change meaning.
SIGNATURE_VERSION = 2
# Comparisons of the 9x8 grid decided by at least STEP grey levels; fewer than
# LOW_INFORMATION such comparisons and the hash alone never makes a duplicate.
STEP = 2
LOW_INFORMATION = 16
# Confirming a candidate: the 256-bit dHash within H16_MAX bits and the thumbnails'
# correlation at least CORR_MIN (bench_quality measures both), for thresholds up to the
# default d = 4; looser for larger ones (`thresholds`).
H16_MAX, CORR_MIN = 32, 0.90
# A candidate beyond the policy's threshold (within search_radius) needs this correlation.
CORR_STRICT = 0.95
# Level and contrast: a copy's thumbnail mean within LEVEL_SHARE of the brighter one (or
# LEVEL_MIN grey levels), its standard deviation within a factor CONTRAST_MAX (brightness
# and contrast edits of 20% stay inside).
LEVEL_SHARE, LEVEL_MIN, CONTRAST_MAX = 0.25, 6.0, 1.35
# A thumbnail this close to a plane (`Signatures.curved`) is a gradient: it matches only
# with this correlation, level difference and contrast ratio.
CURVED_MIN, PLANE_CORR, PLANE_LEVEL, PLANE_CONTRAST = 0.3, 0.99, 8.0, 1.3
# Two content boxes (see `content`) further apart than this (1/255 of the frame) are not
# the same picture.
BOX_MAX = 24
# The signature's content box: pixels off the ground by this share of the strongest
# contrast; a box larger than CONTENT_MAX_AREA of the image means "the whole image".
CONTENT_SHARE, CONTENT_MAX_AREA = 0.2, 0.6
# A thumbnail this flat (standard deviation in grey levels) carries no shape at all:
# such an image is a duplicate only of a byte-identical copy. (A faint texture, a
# standard deviation of 1, keeps its shape in a version 2 thumbnail.)
FLAT_STD = 0.5
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

    def run(lines: np.ndarray) -> int:
        """Lines of a bar at this side: black or white, uniform, ending in a real edge
        (a line most of whose pixels differ from the bar, not a halo fading out). Most
        pictures have no bar: their sides cost one median of a line."""
        ref = _median(lines[0])
        if BAR_DARK < ref < BAR_LIGHT:
            return 0
        dev = np.abs(lines.astype(np.int16) - ref)
        off = dev.max(axis=1) > tolerance
        if not off.any():
            return len(lines)
        edge = int(np.argmax(off))
        return edge if dev[edge].mean() > tolerance else 0

    top, bottom = run(small), run(small[::-1])
    left, right = run(small.T), run(small.T[::-1])
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


WHOLE = bytes([0, 255, 0, 255])


@dataclass(frozen=True)
class Signature:
    """The confirming signature of one image (`to_bytes`: SIGNATURE_BYTES bytes).

    Version 2 keeps the thumbnail's level (mean) and contrast (std) apart from its shape
    (the z-scored thumbnail, 1/32 of a standard deviation per step): version 1 stored
    grey levels, so a faint texture (a thumbnail std of 1) was two or three levels and
    its shape lost to rounding. Version 1 signatures (stored before) are still read and
    compared with either version (`levels` is what both hold)."""

    h16: bytes  # 256-bit dHash of size 16, dedupd's bit order (32 bytes)
    thumb: bytes  # 16x16 thumbnail, row-major (256 bytes): v2 z-scored, v1 grey levels
    info: int  # information of the 9x8 grid the 64-bit hash came from
    mean: float = 0.0  # v2: the thumbnail's mean and standard deviation in grey levels
    std: float = 0.0
    # v2: where the content is in the frame, (top, bottom, left, right) in 1/255 of its
    # height and width; (0, 255, 0, 255) for the whole frame. Two blobs that a 16x16
    # thumbnail of the content shows alike differ in place and size.
    box: bytes = WHOLE
    version: int = SIGNATURE_VERSION

    def to_bytes(self) -> bytes:
        head = bytes([self.version, min(self.info, 255)]) + self.h16
        if self.version == 1:
            return head + self.thumb
        return (head + np.array([self.mean, self.std], "<f2").tobytes() + self.box
                + self.thumb)

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature | None:
        """None for a signature of an unknown version (or none): no second look."""
        if len(data) == V1_BYTES and data[:1] == b"\x01":
            return cls(h16=data[2:34], thumb=data[34:], info=data[1], version=1)
        if len(data) != SIGNATURE_BYTES or data[0] != SIGNATURE_VERSION:
            return None
        mean, std = np.frombuffer(data[34:38], "<f2").astype(float).tolist()
        return cls(h16=data[2:34], thumb=data[42:], info=data[1], mean=mean, std=std,
                   box=data[38:42])

    def levels(self) -> np.ndarray:
        """The thumbnail in grey levels (float32, 256 values), whatever the version."""
        t = np.frombuffer(self.thumb, np.uint8).astype(np.float32)
        return t if self.version == 1 else self.mean + self.std * (t - 128) / Z_STEPS

    @property
    def low_information(self) -> bool:
        return self.info < LOW_INFORMATION

    @cached_property
    def unpacked(self) -> Signatures:
        """This signature alone as `Signatures` (made once: a newcomer is compared with
        up to CANDIDATES stored signatures)."""
        return Signatures.of([self])


V1_BYTES = 2 + 32 + 256
SIGNATURE_BYTES = 2 + 32 + 4 + 4 + 256
Z_STEPS = 32  # steps per standard deviation in a v2 thumbnail


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


def _median(values: np.ndarray) -> int:
    """int(np.median(values)) of non-negative integers (a line, a small image; views
    too), from a partial sort: np.median's Python layers cost more than the work here
    (they were most of trim_borders' time)."""
    flat = values.ravel()
    lo, hi = (flat.size - 1) // 2, flat.size // 2
    part = np.partition(flat, (lo, hi))
    return (int(part[lo]) + int(part[hi])) // 2


def _mean_std(thumb: np.ndarray) -> tuple[np.float32, np.float32]:
    """thumb.mean() and thumb.std() of the 16x16 float32 thumbnail, bit for bit (the
    same float32 pairwise sums numpy's methods make; dividing by 256 is exact) without
    their Python layers, which cost three times the arithmetic here."""
    n = np.float32(thumb.size)
    mean = np.add.reduce(thumb, axis=None) / n
    dev = thumb - mean
    return mean, np.sqrt(np.add.reduce(dev * dev, axis=None) / n)


def content(gray: np.ndarray) -> tuple[int, int, int, int]:
    """The part of an image that holds its picture when that is a small object on a plain
    ground (a nebula on black sky, a text block on white): the bounding box, plus a
    margin, of pixels that stand out from the ground by a fifth of the strongest contrast
    (its 99.5th percentile). The whole image otherwise. A 16x16 thumbnail of the whole
    frame would show any two such images as "a blob in the middle" and call them alike.
    Returned as the box (top, bottom, left, right). OpenCV calls throughout: tens of
    microseconds on a reduced image."""
    h, w = gray.shape[:2]
    ground = _median(cv2.resize(gray, (min(w, 48), min(h, 48)), interpolation=cv2.INTER_AREA))
    dev = cv2.absdiff(gray, np.full_like(gray, ground))
    counts = np.cumsum(cv2.calcHist([dev], [0], None, [256], [0, 256]).ravel())
    strongest = int(np.searchsorted(counts, 0.995 * counts[-1]))
    whole = (0, h, 0, w)
    if strongest < 8:
        return whole
    _, mask = cv2.threshold(dev, CONTENT_SHARE * strongest, 255, cv2.THRESH_BINARY)
    x0, y0, bw, bh = cv2.boundingRect(mask)
    if bw * bh == 0:
        return whole
    my, mx = bh // 10 + 1, bw // 10 + 1
    y0, y1, x0, x1 = max(0, y0 - my), min(h, y0 + bh + my), max(0, x0 - mx), min(w, x0 + bw + mx)
    if (y1 - y0) * (x1 - x0) > CONTENT_MAX_AREA * h * w:
        return whole
    return y0, y1, x0, x1


def signature(gray: np.ndarray, grid: np.ndarray | None = None) -> Signature:
    """The signature of a (reduced, trimmed) grayscale image whose 64-bit hash came from
    the 9x8 `grid` (computed here when not given). The picture's content is reduced once
    to 32x32 (in floating point: a faint picture keeps its shape in the thumbnail); the
    thumbnail and the 17x16 grid come from that."""
    if grid is None or grid.shape != (8, 9):
        grid = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
    y0, y1, x0, x1 = content(gray)
    body = cv2.resize(gray[y0:y1, x0:x1].astype(np.float32), (32, 32),
                      interpolation=cv2.INTER_AREA)
    # The 256-bit hash from whole grey levels, as in version 1: a black sky's ties stay
    # ties (0 bits) instead of bits decided by noise.
    g17 = np.rint(cv2.resize(body, (17, 16), interpolation=cv2.INTER_AREA))
    thumb = cv2.resize(body, (16, 16), interpolation=cv2.INTER_AREA)
    mean, std = (float(np.float16(v)) for v in _mean_std(thumb))  # as stored
    z = np.clip(np.rint(128 + Z_STEPS * (thumb - mean) / max(std, 1e-6)), 0, 255)
    h, w = gray.shape[:2]
    box = bytes(round(255 * v / n) for v, n in ((y0, h), (y1, h), (x0, w), (x1, w)))
    return Signature(grid_hash(g17), z.astype(np.uint8).tobytes(), information(grid),
                     mean, std, box)


class Signatures:
    """Signatures unpacked for comparison in numpy, any leading shape: the second look
    compares one pair, bench_quality millions, with this same code."""

    def __init__(self, h16: np.ndarray, levels: np.ndarray, info: np.ndarray,
                 box: np.ndarray) -> None:
        self.h16 = h16  # (..., 4) uint64
        self.info = info.astype(np.int32)
        self.box = box.astype(np.int16)  # (..., 4)
        self.mean = levels.mean(-1)
        self.std = levels.std(-1)
        self.z = (levels - self.mean[..., None]) / np.maximum(self.std, 1e-6)[..., None]
        # How far the shape is from a plane (a gradient): the residual of a least-squares
        # plane through the z-scored thumbnail, 0 for a linear gradient, ~1 for texture.
        self.curved = np.sqrt(np.square(self.z - self.z @ _PLANE.T).mean(-1))

    def __getitem__(self, index: object) -> Signatures:
        """The signatures at `index` (numpy indexing over the leading axes)."""
        out = object.__new__(Signatures)
        for name in ("h16", "info", "box", "mean", "std", "z", "curved"):
            setattr(out, name, getattr(self, name)[index])
        return out

    @classmethod
    def of(cls, sigs: Sequence[Signature]) -> Signatures:
        return cls(np.stack([np.frombuffer(s.h16, "<u8") for s in sigs]),
                   np.stack([s.levels() for s in sigs]), np.array([s.info for s in sigs]),
                   np.array([list(s.box) if s.version > 1 else [-1] * 4 for s in sigs]))

    @classmethod
    def from_raw(cls, raw: np.ndarray) -> Signatures:
        """From stored bytes of the current version, shape (..., SIGNATURE_BYTES)."""
        mean, std = (np.ascontiguousarray(raw[..., k:k + 2]).view("<f2")[..., 0]
                     .astype(np.float32) for k in (34, 36))
        z = (raw[..., 42:].astype(np.float32) - 128) / Z_STEPS
        return cls(np.ascontiguousarray(raw[..., 2:34]).view("<u8"),
                   mean[..., None] + std[..., None] * z, raw[..., 1], raw[..., 38:42])


def _plane_projector() -> np.ndarray:
    yy, xx = np.mgrid[0:16, 0:16]
    basis = np.stack([np.ones(256), xx.ravel(), yy.ravel()], 1)
    return (basis @ np.linalg.pinv(basis)).astype(np.float32)


_PLANE = _plane_projector()


def metrics(a: Signatures, b: Signatures) -> dict[str, np.ndarray]:
    """How alike two (sets of) signatures are, element by element."""
    lo, hi = np.minimum(a.std, b.std), np.maximum(a.std, b.std)
    return {"h16": np.bitwise_count(a.h16 ^ b.h16).astype(np.int32).sum(-1),
            "corr": (a.z * b.z).mean(-1),
            "std": lo,
            "contrast": hi / np.maximum(lo, 1e-6),
            "level": np.abs(a.mean - b.mean),
            "bright": np.maximum(a.mean, b.mean),
            "curved": np.minimum(a.curved, b.curved),
            # Where two content boxes are: only when both are boxes (the whole frame, and
            # version 1 signatures, which hold no box, do not count against a match).
            "box": np.where(_boxed(a.box) & _boxed(b.box), np.abs(a.box - b.box).max(-1), 0)}


def _boxed(box: np.ndarray) -> np.ndarray:
    return (box[..., 0] >= 0) & (np.abs(box - np.array(list(WHOLE))).max(-1) > 0)


def accepts(m: dict[str, np.ndarray], distance: np.ndarray | int, max_distance: int = 4
            ) -> np.ndarray:
    """The second look's verdict on candidates `distance` bits apart (64-bit hashes)
    whose signatures compare as `m` (`metrics`). The same picture has the same shape
    (256-bit hash and thumbnail correlation), and a level and contrast no further apart
    than a brightness or contrast edit takes them. Shapes that say little need more:
    a plane (a gradient: any two running the same way correlate) must match in level
    and contrast closely, and a content box (a small object on a plain ground) must
    sit at the same place. Beyond `max_distance` (up to `search_radius`) the shape
    must match strictly. bench_quality measured every constant here."""
    h16_max, corr_min = thresholds(max_distance)
    level_min, contrast_max = level_thresholds(max_distance)
    distance = np.asarray(distance)
    shape = (m["std"] >= FLAT_STD) & (m["h16"] <= h16_max) & (m["corr"] >= corr_min)
    strict = (distance <= max_distance) | (m["corr"] >= max(corr_min, CORR_STRICT))
    levels = ((m["contrast"] <= contrast_max)
              & (m["level"] <= np.maximum(level_min, LEVEL_SHARE * m["bright"])))
    plane = ((m["curved"] >= CURVED_MIN)
             | ((m["corr"] >= PLANE_CORR) & (m["level"] <= PLANE_LEVEL)
                & (m["contrast"] <= PLANE_CONTRAST)))
    return shape & strict & levels & plane & (m["box"] <= BOX_MAX)


def thresholds(max_distance: int) -> tuple[int, float]:
    """(max 256-bit distance, min correlation) for a policy's 64-bit threshold: the
    defaults up to d = 4, looser beyond (a policy that accepts more different copies
    must not have them refused by the second look)."""
    return max(H16_MAX, 8 * max_distance), min(CORR_MIN, 1 - max_distance / 40)


def level_thresholds(max_distance: int) -> tuple[float, float]:
    """(level difference always allowed, max contrast ratio): the defaults up to d = 4,
    looser beyond, as `thresholds` (a brightness offset of 10 grey levels is a large
    share of a dark picture's mean)."""
    extra = max(0, max_distance - 4)
    return LEVEL_MIN + 2 * extra, CONTRAST_MAX + 0.05 * extra


def search_radius(max_distance: int) -> int:
    """How far candidates are looked up for a policy's threshold: from d = 4 on, up to
    the next multiple of 4 less one (4 -> 7), which the multi-index lookup probes in the
    same buckets. A candidate beyond max_distance counts only if `accepts` says so."""
    return max_distance | 3 if max_distance >= 4 else max_distance


def confirms(a: Signature, b: Signature, max_distance: int = 4,
             distance: int | None = None) -> bool:
    """Do two candidates (64-bit dHashes `distance` bits apart, by default within
    `max_distance`) show the same picture? A flat thumbnail has no shape to compare:
    never (only a byte-identical copy is)."""
    m = _pair_metrics(a.unpacked, b.unpacked)
    return bool(accepts(m, max_distance if distance is None else distance, max_distance))


def _pair_metrics(a: Signatures, b: Signatures) -> dict[str, float]:
    """`metrics` of one pair, in scalars: a tenth of the time of the vectorised form on
    one pair (bench_quality's self-check holds the two to the same verdicts)."""
    lo, hi = sorted((float(a.std[0]), float(b.std[0])))
    ba, bb = a.box[0].tolist(), b.box[0].tolist()
    boxed = ba[0] >= 0 and bb[0] >= 0 and ba != list(WHOLE) and bb != list(WHOLE)
    mean_a, mean_b = float(a.mean[0]), float(b.mean[0])
    return {"h16": sum((x ^ y).bit_count() for x, y in zip(a.h16[0].tolist(),
                                                           b.h16[0].tolist(), strict=True)),
            "corr": float(np.dot(a.z[0], b.z[0])) / a.z.shape[-1],
            "std": lo,
            "contrast": hi / max(lo, 1e-6),
            "level": abs(mean_a - mean_b),
            "bright": max(mean_a, mean_b),
            "curved": min(float(a.curved[0]), float(b.curved[0])),
            "box": max(abs(x - y) for x, y in zip(ba, bb, strict=True)) if boxed else 0}
