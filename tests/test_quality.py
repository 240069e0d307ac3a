"""Detection quality on real decoded images: the second look keeps dark, flat and blank
images apart, letterboxed and (opt-in) flipped or rotated copies are caught, and `check`
takes many files. bench/bench_quality.py measures the same at scale."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import photo, write_image

from dedupd.hashing import Recipe, hamming, hash_bytes, hash_file
from dedupd.pipeline import find_duplicates
from dedupd.signature import Signature, confirms, search_radius
from dedupd.store import ImageRecord, open_store


def dedupd(*args: str, check: int | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "dedupd", *args], capture_output=True,
                          text=True, timeout=180)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def blob_on_black(seed: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """A telescope-like frame: one nebula-like shape in the middle of a black sky. The
    shapes differ (orientation, elongation, a ring or a double lobe), their place and
    size do not: to a 9x8 grid they are all "a blob in the middle"."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    centre = (w // 2 + int(rng.integers(-8, 8)), h // 2 + int(rng.integers(-8, 8)))
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    axes = (int(rng.integers(30, 60)), int(rng.integers(12, 40)))
    angle = float(rng.uniform(0, 180))
    kind = seed % 3
    cv2.ellipse(img, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
    if kind == 1:  # a ring
        cv2.ellipse(img, centre, (axes[0] // 2, axes[1] // 2), angle, 0, 360, (0, 0, 0), -1,
                    cv2.LINE_AA)
    elif kind == 2:  # a second lobe
        off = (centre[0] + axes[0] // 2, centre[1] - axes[1] // 2)
        cv2.circle(img, off, axes[1], tuple(c // 2 for c in colour), -1, cv2.LINE_AA)
    for _ in range(12):  # a few faint stars
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.circle(img, (x, y), 1, (90, 90, 90), -1)
    return cv2.GaussianBlur(img, (0, 0), 2.5)


def encode(img: np.ndarray, ext: str = ".jpg", quality: int = 92) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    return cv2.imencode(ext, img, params)[1].tobytes()


def test_blobs_on_black_collide_in_dhash_but_not_after_the_second_look() -> None:
    images = [encode(blob_on_black(s)) for s in range(10)]
    v1 = [hash_bytes(d, Recipe(version=1)).hash for d in images]
    # The problem the second look solves: today's recipe calls some of them duplicates.
    assert min(hamming(a, b) for i, a in enumerate(v1) for b in v1[i + 1:]) <= 4
    hashed = [hash_bytes(d) for d in images]
    for i, a in enumerate(hashed):
        for b in hashed[i + 1:]:
            if hamming(a.hash, b.hash) <= 4:
                assert not confirms(a.signature, b.signature)  # type: ignore[arg-type]
    # ... while a re-encoded copy of each is confirmed.
    for seed, a in enumerate(hashed):
        copy = hash_bytes(encode(blob_on_black(seed), quality=70))
        assert hamming(a.hash, copy.hash) <= 4
        assert confirms(a.signature, copy.signature)  # type: ignore[arg-type]


def test_flat_images_are_low_information_and_confirm_nothing() -> None:
    grey = hash_bytes(encode(np.full((100, 100, 3), 128, np.uint8)))
    black = hash_bytes(encode(np.zeros((1, 1, 3), np.uint8), ".png"))
    assert grey.low_information and black.low_information
    assert grey.hash == black.hash == 0  # the hash cannot tell them apart
    assert not confirms(grey.signature, black.signature)  # type: ignore[arg-type]
    assert not confirms(grey.signature, grey.signature)  # type: ignore[arg-type]
    assert not hash_bytes(encode(photo(1))).low_information


def test_signature_round_trips_and_other_versions_are_ignored() -> None:
    sig = hash_bytes(encode(photo(2))).signature
    assert sig is not None and Signature.from_bytes(sig.to_bytes()) == sig
    assert Signature.from_bytes(b"\x09" + sig.to_bytes()[1:]) is None
    assert Signature.from_bytes(b"") is None


def test_letterboxed_copy_hashes_like_its_original() -> None:
    img = photo(3)
    bars = cv2.copyMakeBorder(img, 48, 48, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    pad = cv2.copyMakeBorder(img, 0, 0, 64, 64, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    for copy in (bars, pad):
        old = hamming(hash_bytes(encode(img), Recipe(version=1)).hash,
                      hash_bytes(encode(copy), Recipe(version=1)).hash)
        new_a, new_b = hash_bytes(encode(img)), hash_bytes(encode(copy))
        assert old > 4 and hamming(new_a.hash, new_b.hash) <= 2
        assert confirms(new_a.signature, new_b.signature)  # type: ignore[arg-type]


def _record(path: str, data: bytes, scope: str = "s") -> ImageRecord:
    h = hash_bytes(data)
    return ImageRecord(scope=scope, path=path, recipe=h.recipe.key, hash=h.hash,
                       digest=h.digest, file_size=len(data), mtime_ns=1, width=h.width,
                       height=h.height, signature=h.signature.to_bytes())  # type: ignore[union-attr]


def test_second_look_against_the_store(store_url: str) -> None:
    """Signatures are stored with records and read back only for candidates, on both
    backends; flips and rotations are found only when asked, and named."""
    store = open_store(store_url)
    try:
        blobs = [encode(blob_on_black(s)) for s in range(6)]
        original = encode(photo(5))
        ids = store.insert_many([_record(f"/d/blob{i}.jpg", d) for i, d in enumerate(blobs)]
                                + [_record("/d/photo.jpg", original)])
        assert set(store.signatures(ids)) == set(ids)
        for i in range(6):  # each blob matches only itself (byte-identical) ...
            found = find_duplicates(store, "s", hash_bytes(blobs[i]), 4)
            assert [m.record.path for m in found] == [f"/d/blob{i}.jpg"]
            assert found[0].identical
            # ... and its re-encoded copy, confirmed by the signature.
            copy = hash_bytes(encode(blob_on_black(i), quality=75))
            assert [m.record.path for m in find_duplicates(store, "s", copy, 4)] == \
                [f"/d/blob{i}.jpg"]
        flipped = hash_bytes(encode(cv2.flip(photo(5), 1)))
        assert find_duplicates(store, "s", flipped, 4) == []
        (m,) = find_duplicates(store, "s", flipped, 4, flips=True)
        assert m.record.path == "/d/photo.jpg" and m.transform == "hflip"
        turned = hash_bytes(encode(cv2.rotate(photo(5), cv2.ROTATE_90_CLOCKWISE)))
        (m,) = find_duplicates(store, "s", turned, 4, flips=True)
        assert m.transform == "rot90"
    finally:
        store.close()


def test_records_without_a_signature_match_on_the_hash_alone(store_url: str) -> None:
    """A dictionary written before signatures keeps working: its records match as before,
    except that a low-information newcomer is never a duplicate of one."""
    store = open_store(store_url)
    try:
        data = encode(photo(6))
        store.insert(_record("/d/old.jpg", data).with_(signature=None))
        flat = encode(np.full((90, 120, 3), 40, np.uint8))
        store.insert(_record("/d/flat.jpg", flat).with_(signature=None))
        copy = hash_bytes(encode(photo(6), quality=60))
        assert [m.record.path for m in find_duplicates(store, "s", copy, 4)] == ["/d/old.jpg"]
        other_flat = hash_bytes(encode(np.full((90, 120, 3), 200, np.uint8)))
        assert find_duplicates(store, "s", other_flat, 4) == []
        assert find_duplicates(store, "s", hash_bytes(flat), 4)[0].identical
    finally:
        store.close()


def test_blank_images_are_never_duplicates_of_each_other(tmp_path: Path, config_file) -> None:
    """The newcomer's report: a 1x1 black image, a 100x100 grey one and a large black PNG
    were quarantined as duplicates of each other. Now only a byte-identical copy is."""
    data = tmp_path / "data"
    write_image(data / "a_black_1x1.png", np.zeros((1, 1, 3), np.uint8))
    write_image(data / "b_grey.jpg", np.full((100, 100, 3), 128, np.uint8))
    write_image(data / "c_black_big.png", np.zeros((3000, 4000, 3), np.uint8))
    write_image(data / "d_white.png", np.full((300, 400, 3), 255, np.uint8))
    for s in range(4):
        write_image(data / f"e_blob{s}.jpg", blob_on_black(s))
    cfg = str(config_file())
    summary = json.loads(dedupd("--config", cfg, "scan", "--json", str(data), check=0).stdout)
    assert summary["duplicates"] == 0 and summary["indexed"] == 8
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "same.png").write_bytes((data / "c_black_big.png").read_bytes())
    write_image(probe / "grey2.jpg", np.full((100, 100, 3), 100, np.uint8))
    lines = dedupd("--config", cfg, "check", "--json", str(probe), check=1).stdout
    results = {Path(r["path"]).name: r for r in map(json.loads, lines.splitlines())}
    assert results["same.png"]["duplicate"] and results["same.png"]["low_information"]
    assert results["same.png"]["matches"][0]["identical"]
    assert not results["grey2.jpg"]["duplicate"] and results["grey2.jpg"]["low_information"]


def test_check_many_files_json_lines(tmp_path: Path, config_file, make_photo) -> None:
    data = tmp_path / "data"
    for s in range(3):
        make_photo(f"img{s}.jpg", seed=s, root=data)
    cfg = str(config_file())
    dedupd("--config", cfg, "scan", str(data), check=0)
    probe = tmp_path / "probe"
    write_image(probe / "copy.jpg", photo(1), quality=60)
    write_image(probe / "sub" / "new.jpg", photo(77))
    (probe / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    lone = make_photo("lone.jpg", seed=50)
    proc = dedupd("--config", cfg, "check", "--json", str(probe), str(lone), check=1)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 4
    assert by_name["copy.jpg"]["duplicate"]
    assert by_name["copy.jpg"]["matches"][0]["path"] == str(data / "img1.jpg")
    assert not by_name["new.jpg"]["duplicate"] and not by_name["lone.jpg"]["duplicate"]
    assert by_name["broken.jpg"]["error"] in ("corrupt", "truncated")
    # Without a duplicate, an unreadable file makes it exit 2; all unique exits 0.
    dedupd("--config", cfg, "check", str(probe / "sub"), str(probe / "broken.jpg"), check=2)
    out = dedupd("--config", cfg, "check", str(probe / "sub"), check=0).stdout
    assert out.startswith("unique  ")


def test_flips_and_rotations_are_opt_in_per_policy(tmp_path: Path, config_file) -> None:
    """Under a watch root, scan applies the daemon's pipeline: the event names the
    transform when the policy asks for flips and rotations, and nothing matches if not."""
    for flips, expect in ((False, 0), (True, 1)):
        root = tmp_path / f"root{int(flips)}"
        write_image(root / "a.jpg", photo(8))
        write_image(root / "b_mirror.jpg", cv2.flip(photo(8), 1))
        cfg = str(config_file({
            "watches": [{"path": str(root), "policy": "p"}],
            "policies": {"p": {"action": "log", "match_flips_rotations": flips}},
        }))
        proc = dedupd("--config", cfg, "--log", "json", "scan", "--json", str(root))
        assert json.loads(proc.stdout)["duplicates"] == expect, proc.stderr
        events = [json.loads(line) for line in proc.stderr.splitlines()
                  if line.startswith("{")]
        logged = [e for e in events if e["event"] == "duplicate_logged"]
        assert len(logged) == expect
        if flips:
            assert logged[0]["transform"] == "hflip"
            assert logged[0]["match"] == str(root / "a.jpg")


@pytest.mark.parametrize("name", ["astronaut", "hubble"])
def test_real_photos_keep_their_copies(name: str) -> None:
    """On the committed photographs the second look confirms every ordinary copy."""
    path = Path(__file__).parent / "fixtures" / "photos" / f"{name}.jpg"
    original = hash_file(path)
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    copies = [encode(img, quality=50), encode(img, ".png"),
              encode(cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)),
              encode(cv2.convertScaleAbs(img, alpha=1.15))]
    for data in copies:
        copy = hash_bytes(data)
        assert hamming(original.hash, copy.hash) <= 4
        assert confirms(original.signature, copy.signature)  # type: ignore[arg-type]


def test_a_v1_dictionary_is_rehashed_to_v2_by_scan(tmp_path: Path, config_file,
                                                   make_photo) -> None:
    """Upgrading: records keep their recipe and are compared only with their own; a scan
    (like the daemon's start-up reconciliation) re-hashes files recorded with another."""
    data = tmp_path / "data"
    for s in range(3):
        make_photo(f"img{s}.jpg", seed=s, root=data)
    cfg = str(config_file({"hash": {"version": 1}}))
    dedupd("--config", cfg, "scan", str(data), check=0)
    store = open_store(str(tmp_path / "state" / "index.sqlite"))
    assert {r.recipe for r in store.iter_records()} == {"dhash:8:fast:area:v1"}
    store.close()
    letterboxed = tmp_path / "probe" / "wide.jpg"
    write_image(letterboxed, cv2.copyMakeBorder(photo(1), 60, 60, 0, 0,
                                                cv2.BORDER_CONSTANT, value=(0, 0, 0)))
    cfg = str(config_file())
    # v2 compares with v2 records only: none yet.
    dedupd("--config", cfg, "check", str(letterboxed), check=0)
    summary = json.loads(dedupd("--config", cfg, "scan", "--json", str(data), check=0).stdout)
    assert summary["indexed"] == 3 and summary["known"] == 0
    store = open_store(str(tmp_path / "state" / "index.sqlite"))
    assert {r.recipe for r in store.iter_records()} == {"dhash:8:fast:area:v2"}
    assert len(store.signatures([r.id for r in store.iter_records()])) == 3  # type: ignore[misc]
    store.close()
    js = json.loads(dedupd("--config", cfg, "check", "--json", str(letterboxed), check=1).stdout)
    assert js["matches"][0]["path"] == str(data / "img1.jpg")
    summary = json.loads(dedupd("--config", cfg, "scan", "--json", str(data), check=0).stdout)
    assert summary["known"] == 3


def _gradient(lo: float, hi: float, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    w, h = size
    row = np.linspace(lo, hi, w, dtype=np.float32)
    return cv2.merge([np.tile(row, (h, 1)).astype(np.uint8)] * 3)


def test_gradients_running_the_same_way_are_told_apart_by_level_and_contrast() -> None:
    """Every left-to-right gradient has the same dHash and the same shape: only its
    levels tell it from another (a plane's thumbnail must match them closely)."""
    a = hash_bytes(encode(_gradient(40, 200)))
    for other in ((90, 160), (20, 120), (120, 250)):
        b = hash_bytes(encode(_gradient(*other)))
        assert hamming(a.hash, b.hash) <= 4
        assert not confirms(a.signature, b.signature), other  # type: ignore[arg-type]
    copy = hash_bytes(encode(cv2.resize(_gradient(40, 200), (320, 240)), quality=60))
    assert confirms(a.signature, copy.signature)  # type: ignore[arg-type]


def _faint(seed: int) -> np.ndarray:
    """A barely visible texture on grey (a standard deviation of about one grey level)."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.normal(0, 1.5, (12, 16)).astype(np.float32), (640, 480),
                       interpolation=cv2.INTER_CUBIC)
    return cv2.merge([np.clip(128 + field, 0, 255).astype(np.uint8)] * 3)


def test_a_faint_texture_keeps_its_shape() -> None:
    """Version 2 thumbnails keep a faint picture's shape (version 1 rounded it to a few
    grey levels and called it flat, so its copies were never found)."""
    a = hash_bytes(encode(_faint(1), ".png"))
    assert 0.5 < a.signature.std < 2  # type: ignore[union-attr]
    assert confirms(a.signature, hash_bytes(encode(_faint(1), quality=90)).signature)  # type: ignore[arg-type]
    for seed in (2, 3, 4):
        assert not confirms(a.signature, hash_bytes(encode(_faint(seed))).signature)  # type: ignore[arg-type]


def _disc(centre: tuple[int, int], radius: int) -> np.ndarray:
    img = np.full((480, 640, 3), 90, np.uint8)
    cv2.circle(img, centre, radius, (230, 230, 230), -1, cv2.LINE_AA)
    return img


def test_a_small_object_elsewhere_in_the_frame_is_another_picture() -> None:
    """The thumbnail is of the content box (a disc, whatever its place and size); where
    the box sits in the frame tells two such pictures apart."""
    a = hash_bytes(encode(_disc((320, 240), 60)))
    assert a.signature.box != bytes([0, 255, 0, 255])  # type: ignore[union-attr]
    assert confirms(a.signature, hash_bytes(encode(_disc((320, 240), 60), quality=70)).signature)  # type: ignore[arg-type]
    for other in (((200, 240), 60), ((320, 240), 100)):
        assert not confirms(a.signature, hash_bytes(encode(_disc(*other))).signature)  # type: ignore[arg-type]


def test_version_1_signatures_are_still_compared() -> None:
    """Signatures stored before version 2 (grey-level thumbnail, no level, contrast or
    box) are read and compared with new ones: no migration."""
    sig = hash_bytes(encode(photo(2))).signature
    assert sig is not None and sig.version == 2
    v1 = Signature(h16=sig.h16, thumb=np.clip(np.rint(sig.levels()), 0, 255)
                   .astype(np.uint8).tobytes(), info=sig.info, version=1)
    stored = Signature.from_bytes(v1.to_bytes())
    assert stored == v1 and len(v1.to_bytes()) == 290
    assert confirms(hash_bytes(encode(photo(2), quality=60)).signature, stored)  # type: ignore[arg-type]
    assert not confirms(hash_bytes(encode(photo(3))).signature, stored)  # type: ignore[arg-type]


def test_candidates_beyond_the_threshold_need_the_strict_second_look(store_url: str) -> None:
    """Copies whose 64-bit hash drifted 5-7 bits (near-ties flipped) are found when their
    signatures match strictly; a record without a signature, another picture, or a
    policy threshold below 4 never reaches that far."""
    store = open_store(store_url)
    try:
        original = hash_bytes(encode(photo(7)))
        other = hash_bytes(encode(photo(8)))
        drifted = original.hash ^ 0b1011011  # 5 bits away
        store.insert(_record("/d/p.jpg", encode(photo(7))).with_(hash=drifted))
        store.insert(_record("/d/q.jpg", encode(photo(8))).with_(
            hash=other.hash ^ (0b111111 << 20)))  # 6 bits from `other`
        store.insert(_record("/d/old.jpg", encode(photo(9))).with_(
            hash=original.hash ^ (0b1111111 << 40), signature=None))  # 7 bits, no signature
        copy = hash_bytes(encode(photo(7), quality=70))
        assert hamming(copy.hash, drifted) > 4
        found = find_duplicates(store, "s", copy, 4)
        assert [(m.record.path, m.distance) for m in found] == \
            [("/d/p.jpg", hamming(copy.hash, drifted))]
        assert find_duplicates(store, "s", copy, 3) == []
        assert [m.record.path for m in find_duplicates(store, "s", other, 4)] == ["/d/q.jpg"]
        # Another picture under that very hash is refused by the second look.
        stranger = replace(hash_bytes(encode(photo(10))), hash=other.hash)
        assert find_duplicates(store, "s", stranger, 4) == []
    finally:
        store.close()


def _watermarked(img: np.ndarray) -> np.ndarray:
    """A large white word across the picture: the same photo, but its thumbnail changed
    enough to correlate below CORR_STRICT (about 0.92 for photo(21))."""
    out = img.copy()
    h, w = out.shape[:2]
    cv2.putText(out, "SAMPLE", (w // 6, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 3,
                (255, 255, 255), 8)
    return out


def test_beyond_the_threshold_only_a_strict_second_look_confirms(store_url: str) -> None:
    """Real decoded pairs whose 64-bit hashes really are 5 bits apart, with no hash made
    up: a watermarked copy passes the ordinary second look but not the strict one (so
    d <= 4 refuses it, while a policy of 5 takes it), and a brightened copy, confirmed
    strictly, is not found through a record stored without a signature."""
    original, marked = photo(21), _watermarked(photo(21))
    a, b = hash_bytes(encode(original)), hash_bytes(encode(marked, quality=85))
    assert a.signature is not None and b.signature is not None
    far = hamming(a.hash, b.hash)
    assert 4 < far <= search_radius(4)
    assert confirms(a.signature, b.signature, 4, distance=4)  # the same shape, loosely
    assert not confirms(a.signature, b.signature, 4, distance=far)  # not strictly
    store = open_store(store_url)
    try:
        store.insert(_record("/d/original.jpg", encode(original)))
        assert find_duplicates(store, "s", b, 4) == []
        assert [(m.record.path, m.distance) for m in find_duplicates(store, "s", b, far)] == \
            [("/d/original.jpg", far)]
        brighter = hash_bytes(encode(cv2.convertScaleAbs(photo(7), alpha=1.2)))
        assert hamming(brighter.hash, hash_bytes(encode(photo(7))).hash) == 5
        store.insert(_record("/d/seven.jpg", encode(photo(7))))
        assert [(m.record.path, m.distance) for m in find_duplicates(store, "s", brighter, 4)] \
            == [("/d/seven.jpg", 5)]
        # The same record without a signature: the hash alone, within the threshold only.
        store.insert(_record("/d/old.jpg", encode(photo(7))).with_(signature=None))
        store.delete(next(r.id for r in store.iter_records() if r.path == "/d/seven.jpg"))
        assert find_duplicates(store, "s", brighter, 4) == []
        assert [m.record.path for m in find_duplicates(store, "s", brighter, 5)] == \
            ["/d/old.jpg"]
    finally:
        store.close()


def test_check_says_a_match_beyond_the_threshold_took_the_strict_second_look(
        tmp_path: Path, config_file) -> None:
    """A brightened copy 5 bits from its original is reported beside `max_distance: 4`:
    `check` marks it as confirmed by the strict second look (--json and text), and a
    copy within the threshold is not marked."""
    data = tmp_path / "data"
    write_image(data / "seven.jpg", photo(7))
    cfg = str(config_file())
    dedupd("--config", cfg, "scan", str(data), check=0)
    probe = tmp_path / "probe"
    write_image(probe / "brighter.jpg", cv2.convertScaleAbs(photo(7), alpha=1.2))
    write_image(probe / "q60.jpg", photo(7), quality=60)
    lines = dedupd("--config", cfg, "check", "--json", str(probe), check=1).stdout
    rows = {Path(r["path"]).name: r for r in map(json.loads, lines.splitlines())}
    (far,), (near,) = rows["brighter.jpg"]["matches"], rows["q60.jpg"]["matches"]
    assert rows["brighter.jpg"]["max_distance"] == 4
    assert (far["distance"], far["strict_second_look"]) == (5, True)
    assert near["distance"] <= 4 and near["strict_second_look"] is False
    text = dedupd("--config", cfg, "check", str(probe / "brighter.jpg"), check=1).stdout
    assert f"    5  {data / 'seven.jpg'}  (beyond max_distance 4: strict second look)" in text
    text = dedupd("--config", cfg, "check", str(probe / "q60.jpg"), check=1).stdout
    assert "strict" not in text
