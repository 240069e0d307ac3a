"""dHash recipes on real encoded images, and every bad-input case."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import seed_recipe

from dedupd.hashing import (
    ImageError,
    Recipe,
    hamming,
    hash_bytes,
    hash_file,
    hash_to_hex,
)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
@pytest.mark.parametrize("size", [8, 16])
def test_seed_recipe_is_bit_exact(make_photo, ext: str, size: int) -> None:
    for seed in range(4):
        path = make_photo(f"p{seed}{ext}", seed=seed, width=500 + 37 * seed, height=400)
        got = hash_file(path, Recipe("dhash-seed", size)).hash
        assert got == seed_recipe(path, size), (ext, seed)


def test_hex_is_lowercase_and_padded() -> None:
    assert hash_to_hex(0xAB, 8) == "00000000000000ab"
    assert len(hash_to_hex(1, 16)) == 64


def test_area_hash_tolerates_resize_and_recompression(make_photo, tmp_path: Path) -> None:
    dists = []
    for seed in range(10):
        src = make_photo(f"o{seed}.jpg", seed=seed, width=1600, height=1200)
        img = cv2.imread(str(src))
        half = cv2.resize(img, (800, 600), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", half, [cv2.IMWRITE_JPEG_QUALITY, 50])
        assert ok
        a = hash_file(src).hash
        b = hash_bytes(buf.tobytes()).hash
        dists.append(hamming(a, b))
    assert np.mean(dists) <= 2.0 and max(dists) <= 6, dists


def test_fast_decode_close_to_full(make_photo) -> None:
    for seed in range(8):
        path = make_photo(f"f{seed}.jpg", seed=seed, width=2400, height=1600)
        fast = hash_file(path, Recipe(decode="fast")).hash
        full = hash_file(path, Recipe(decode="full")).hash
        assert hamming(fast, full) <= 4


def test_fast_decode_within_2_bits_of_full_on_90_percent(make_photo) -> None:
    """The accuracy target of the reduced decode (bench_hash checks it on a larger set)."""
    dists = []
    for seed in range(20):
        w, h = (1600, 1200) if seed % 2 else (1200, 1600)
        path = make_photo(f"a{seed}.jpg", seed=100 + seed, width=w, height=h, quality=88)
        dists.append(hamming(hash_file(path, Recipe(decode="fast")).hash,
                             hash_file(path, Recipe(decode="full")).hash))
    assert sum(d <= 2 for d in dists) >= 0.9 * len(dists), dists


def test_digest_only_when_asked(make_photo) -> None:
    path = make_photo("d.jpg", seed=5)
    with_digest, without = hash_file(path), hash_file(path, digest=False)
    assert with_digest.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert without.digest is None and with_digest.hash == without.hash


def test_different_images_are_far_apart(make_photo) -> None:
    hashes = [hash_file(make_photo(f"d{s}.jpg", seed=s)).hash for s in range(12)]
    close = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(close) > 8


def test_recipe_key_names_the_pipeline() -> None:
    assert Recipe().key == "dhash:8:fast:area:v2"
    assert Recipe(version=1).key == "dhash:8:fast:area:v1"
    assert Recipe("dhash-seed", 16).key == "dhash-seed:16:full:linear:v1"  # never trims
    assert Recipe.from_key(Recipe("dhash", 16, "full").key) == Recipe("dhash", 16, "full")
    assert Recipe.from_key("dhash:8:fast:area:v1") == Recipe(version=1)


def test_exif_orientation_is_applied_in_both_paths(tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    a = np.zeros((300, 600, 3), np.uint8)
    a[:, :150] = 255
    a[:100, :] = 128
    img = pil.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rotated = tmp_path / "rot.jpg"
    img.save(rotated, exif=exif, quality=95)
    upright = tmp_path / "upright.jpg"
    pil.fromarray(np.ascontiguousarray(np.rot90(a, -1))).save(upright, quality=95)
    for recipe in (Recipe(), Recipe(decode="full"), Recipe("dhash-seed")):
        assert hamming(hash_file(rotated, recipe).hash, hash_file(upright, recipe).hash) <= 2


# ---------------------------------------------------------------- bad input


def kind_of(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        hash_bytes(data, **kw)
    assert info.value.reason and "\n" not in info.value.reason
    return info.value.kind


def encoded(ext: str, w: int = 400, h: int = 300) -> bytes:
    from conftest import photo

    ok, buf = cv2.imencode(ext, photo(1, w, h))
    assert ok
    return buf.tobytes()


def test_zero_byte() -> None:
    assert kind_of(b"") == "empty"


def test_non_image() -> None:
    assert kind_of(b"hello, this is plain text and not an image at all\n" * 10) == "unsupported"
    assert kind_of(b"GIF89a" + b"\0" * 100) == "unsupported"


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
@pytest.mark.parametrize("keep", [0.3, 0.7, 0.99])
def test_truncated(ext: str, keep: float) -> None:
    data = encoded(ext)
    assert kind_of(data[: int(len(data) * keep)]) in ("truncated", "corrupt")


def test_truncated_jpeg_is_reported_as_truncated() -> None:
    data = encoded(".jpg", 1200, 900)
    # Some OpenCV builds return a grey-filled full-size picture for this; we never decode it.
    assert kind_of(data[: len(data) // 3]) == "truncated"


def test_jpeg_end_marker_must_follow_the_last_scan() -> None:
    data = encoded(".jpg", 1200, 900)
    assert hash_bytes(data).width == 1200
    assert hash_bytes(data + b"\0" * 100).width == 1200  # padding after the end is fine
    # A second scan started after the end marker and cut short.
    assert kind_of(data + b"\xff\xda\x00\x0c" + b"\x12" * 50) == "truncated"
    # An embedded thumbnail's end marker before the main scan does not count.
    thumb = encoded(".jpg", 160, 120)
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 2) + thumb
    with_thumb = data[:2] + app1 + data[2:]
    assert hash_bytes(with_thumb).width == 1200
    assert kind_of(with_thumb[: len(with_thumb) * 2 // 3]) == "truncated"


def test_corrupt_jpeg_body() -> None:
    data = bytearray(encoded(".jpg"))
    data[4:400] = b"\x00" * 396  # smash the marker segments after SOI
    assert kind_of(bytes(data)) == "corrupt"


def test_decompression_bomb_refused_from_header() -> None:
    # A PNG header declaring 100k x 100k pixels, with no pixel data at all.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4 + b"IEND"
    assert kind_of(data) == "too_large"
    assert kind_of(encoded(".png", 400, 300), max_pixels=1000) == "too_large"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        hash_file(tmp_path / "missing.jpg")
    assert info.value.kind == "vanished"
    with pytest.raises(ImageError) as info:
        hash_file(tmp_path)
    assert info.value.kind in ("not_regular", "unreadable")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO swapped in for an image must not wedge a worker on open()."""
    import os
    import threading

    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def attempt() -> None:
        try:
            hash_file(fifo)
        except ImageError as exc:
            outcome.append(exc.kind)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(fifo, "wb"):  # unblock the stuck open() so the thread can end
            pass
        pytest.fail("hash_file blocked opening a FIFO")
    assert outcome == ["not_regular"]


def test_the_signatures_shortcuts_compute_what_numpy_does() -> None:
    """signature._median and _mean_std replace np.median and numpy's mean/std for speed;
    a stored signature must not change by a bit, so they must agree exactly: on lines
    and images of either parity, views, ties and two-valued data (where an even count's
    median rounds), and on thumbnails of any level and contrast."""
    from dedupd.signature import _mean_std, _median

    rng = np.random.default_rng(16)
    for n in range(1, 300):
        a = rng.integers(0, 256, (n, 3), dtype=np.uint8)
        two = rng.choice(np.array([7, 8], np.uint8), size=n)  # the median often 7.5
        for values in (a[:, 0], a[::-1, 1], a.T[2], two, a, a.T, a.astype(np.int16)):
            assert _median(values) == int(np.median(values)), (n, values)
    for shape in ((48, 48), (37, 48), (1, 1), (2, 2)):
        img = cv2.resize(rng.integers(0, 256, (100, 90), dtype=np.uint8), shape[::-1],
                         interpolation=cv2.INTER_AREA)
        assert _median(img) == int(np.median(img))
    for _ in range(20_000):
        thumb = (rng.random((16, 16), dtype=np.float32) * rng.uniform(0.01, 255)
                 + rng.uniform(0, 200)).astype(np.float32)
        if rng.random() < 0.2:
            thumb = np.rint(thumb)
        mean, std = _mean_std(thumb)
        assert (mean, std) == (thumb.mean(), thumb.std())
        assert mean.dtype == std.dtype == np.float32
