"""dHash on real photographs: pinned hashes, the seed recipe, and the kinds of copy
a dataset really receives (re-encoded, downscaled, converted to PNG)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import seed_recipe

from dedupd.hashing import Recipe, hamming, hash_bytes, hash_file, hash_to_hex

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
NAMES = ("astronaut", "chelsea", "coffee", "hubble", "rocket")

# Hashes of the committed files. If one changes, the bits of the recipe changed: bump
# PIPELINE_VERSION so stored dictionaries are not compared against different bits.
PINNED = {
    "astronaut": ("65a94cb9b0bdb1bb", "4bc1683992959bbb"),
    "chelsea": ("f1e1d295595a282a", "71add614495a2032"),
    "coffee": ("68f0d478ccda9fcf", "e5329470d69d9def"),
    "hubble": ("9a062aac21454b06", "a5394ab6721968ae"),
    "rocket": ("8b0909090b030307", "8b0d0d08090d0307"),
}


def photo(name: str) -> Path:
    return PHOTOS / f"{name}.jpg"


@pytest.mark.parametrize("name", NAMES)
def test_pinned_hashes(name: str) -> None:
    dhash, seed = PINNED[name]
    assert hash_file(photo(name)).hex == dhash
    assert hash_file(photo(name), Recipe("dhash-seed")).hex == seed


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [8, 16])
def test_seed_recipe_bit_exact_on_photos(name: str, size: int) -> None:
    got = hash_file(photo(name), Recipe("dhash-seed", size)).hash
    assert hash_to_hex(got, size) == hash_to_hex(seed_recipe(photo(name), size), size)


def _copies(path: Path) -> dict[str, bytes]:
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    half = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return {
        "q50": cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes(),
        "half-q75": cv2.imencode(".jpg", half, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes(),
        "png": cv2.imencode(".png", img)[1].tobytes(),
        "webp": cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes(),
    }


@pytest.mark.parametrize("name", NAMES)
def test_copies_stay_close_and_other_photos_stay_far(name: str) -> None:
    original = hash_file(photo(name)).hash
    for kind, data in _copies(photo(name)).items():
        assert hamming(original, hash_bytes(data).hash) <= 3, kind
    for other in NAMES:
        if other != name:
            assert hamming(original, hash_file(photo(other)).hash) > 16, other


def test_fast_decode_matches_full_decode_on_photos() -> None:
    for name in NAMES:
        fast = hash_file(photo(name)).hash
        full = hash_file(photo(name), Recipe(decode="full")).hash
        assert hamming(fast, full) <= 2, name


def test_check_finds_a_recompressed_photo(tmp_path: Path, config_file) -> None:
    data = tmp_path / "data"
    shutil.copytree(PHOTOS, data, ignore=shutil.ignore_patterns("*.md"))
    probe = tmp_path / "probe.png"
    probe.write_bytes(_copies(photo("coffee"))["png"])
    cfg = str(config_file())

    def dedupd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dedupd", "--config", cfg, *args],
                              capture_output=True, text=True, timeout=120)

    scan = dedupd("scan", "--json", str(data))
    assert scan.returncode == 0, scan.stderr
    assert json.loads(scan.stdout)["indexed"] == len(NAMES)
    check = dedupd("check", "--json", str(probe))
    assert check.returncode == 1, check.stderr
    result = json.loads(check.stdout)
    assert result["matches"][0]["path"] == str(data / "coffee.jpg")
    assert result["matches"][0]["distance"] <= 3
