"""Benchmark: detection quality. Recall on derived copies, false pairs among distinct images.

    ./dev bench bench_quality [--sets photos,dark,flat] [--limit N] [--sheets]

The corpus is real pictures from Debian packages (fetched once with `apt-get download`,
unpacked under ``$BENCH_QUALITY`` (default ``~/.cache/dedupd-bench``), nothing committed)
plus generated ones, in three sets:

  photos  the photographs among the wallpapers (GNOME, MATE, Plasma, UKUI, Lomiri,
          Debian themes) and scikit-image's sample data, plus 150 of common.py's
          photo-like pictures
  dark    Stellarium's deep-sky images (nebulae, galaxies, clusters: a small blob on
          black) and generated blobs and star fields on black
  flat    the wallpapers that are drawings (an alpha channel, or little texture), the
          flat drawings of scikit-image's sample data, and generated flat greys and
          colours, gradients, documents on white, a few shapes on a plain ground

Each original is scaled to at most 1024 pixels on its long side and saved as the
"original" (JPEG quality 95). Every original gets one copy per transformation
(`TRANSFORMS`), each encoded as JPEG quality 90 unless the transformation is the
encoding. Each encoded file is hashed three ways:

  dedupd v1     today's default recipe (`dhash:8:fast:area:v1`, threshold d <= 4)
  imagehash     `imagehash.phash` and `imagehash.dhash` (PIL full decode)
  dedupd next   the candidate design measured here: uniform borders trimmed from the
                reduced decode, dHash 8, then a confirming signature computed from the
                same reduced decode, and, when asked, the 8 flips/rotations of the query

It prints, per set: recall at the default threshold per transformation; false pairs
among all distinct originals at d = 0..12 for each hash; and for the confirming
signatures (256-bit dHash of size 16, a 16x16 normalised thumbnail compared by
correlation, the same on an equalised thumbnail, a grid information score) how far
apart copies and distinct candidates fall, so a threshold can be chosen. `--sheets`
writes contact sheets of the closest distinct pairs (to check by eye that they really
are distinct) into ``$BENCH_QUALITY/sheets``.

The encoded copies' decodes and imagehash's hashes are cached (``decoded-*.pkl``);
dedupd's own hashes and signatures are computed from those decodes on every run.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import SIZES_SMALL, machine, photo  # noqa: E402

from dedupd import signature  # noqa: E402
from dedupd.hashing import (  # noqa: E402
    ImageHash,
    Recipe,
    decode_flag,
    hash_gray,
    image_size,
    sniff_format,
)

CACHE = Path(os.environ.get("BENCH_QUALITY", Path.home() / ".cache" / "dedupd-bench"))
DECODED_VERSION = 1
MAX_SIDE = 1024
DEFAULT_D = 4

PACKAGES = [
    "gnome-backgrounds", "mate-backgrounds", "plasma-workspace-wallpapers", "ukui-wallpapers",
    "lomiri-wallpapers", "desktop-base", "debian-edu-artwork-spacefun", "python3-skimage",
    "stellarium-data",
]

# scikit-image sample images: which are photographs, which flat drawings or scans.
SKIMAGE_PHOTOS = {"astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins",
                  "grass", "gravel", "hubble_deep_field", "ihc", "moon", "motorcycle_left",
                  "retina", "rocket", "color", "clock_motion"}
SKIMAGE_FLAT = {"text", "page", "horse", "logo", "bw_text", "phantom", "microaneurysms"}


# ---------------------------------------------------------------- corpus


def fetch_packages() -> Path:
    """Unpack the Debian packages once (apt-get download + dpkg-deb -x)."""
    debs, root = CACHE / "debs", CACHE / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        print(f"fetching {' '.join(missing)} with apt-get download ...", flush=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True,
                       stdout=subprocess.DEVNULL)
    for p in PACKAGES:
        target = root / p
        if not target.exists():
            (deb,) = debs.glob(f"{p}_*.deb")
            tmp = root / f".{p}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(target)
    return root


def _largest_per_artwork(paths: list[Path]) -> list[Path]:
    """Wallpaper packages ship one artwork at several resolutions: keep the largest."""
    best: dict[str, Path] = {}
    for p in paths:
        parts = p.parts
        if "contents" in parts:  # Plasma: NAME/contents/images[_dark]/WxH.ext
            i = parts.index("contents")
            key = "/".join(parts[:i + 2])
        else:  # Elephants_3840x2160.jpg, grub-16x9.png
            stem = p.stem
            for sep in ("_", "-"):
                head, _, tail = stem.rpartition(sep)
                if head and "x" in tail and tail.replace("x", "").isdigit():
                    stem = head
            key = str(p.parent / stem)
        if key not in best or p.stat().st_size > best[key].stat().st_size:
            best[key] = p
    return sorted(best.values())


def package_images(root: Path) -> dict[str, list[Path]]:
    exts = {".jpg", ".jpeg", ".png", ".webp"}

    def images(sub: str) -> list[Path]:
        return sorted(p for p in (root / sub).rglob("*") if p.suffix.lower() in exts)

    walls: list[Path] = []
    for pkg in ("gnome-backgrounds", "mate-backgrounds", "plasma-workspace-wallpapers",
                "ukui-wallpapers", "lomiri-wallpapers"):
        walls += [p for p in images(pkg) if p.stem != "screenshot"]
    for pkg in ("desktop-base", "debian-edu-artwork-spacefun"):
        walls += [p for p in images(pkg) if p.stat().st_size > 150_000
                  and "plymouth" not in p.parts and "preview" not in p.stem]
    # GNOME ships each artwork light and dark (-l, -d): one of them.
    walls = [p for p in walls if not p.stem.endswith("-d")]
    skimage = {p.stem: p for p in images("python3-skimage") if "data" in p.parts}
    photos, flat = [], [skimage[k] for k in sorted(SKIMAGE_FLAT) if k in skimage]
    for p in _largest_per_artwork(walls):
        (flat if is_flat_artwork(p) else photos).append(p)
    photos += [skimage[k] for k in sorted(SKIMAGE_PHOTOS) if k in skimage]
    dark = images("stellarium-data/usr/share/stellarium/nebulae/default")
    return {"photos": photos, "dark": dark, "flat": flat}


def is_flat_artwork(path: Path) -> bool:
    """Wallpapers that are drawings rather than photographs: an alpha channel (an overlay,
    mostly transparent) or little texture (gradients, stripes). Cached: 4K PNGs are slow."""
    cache = CACHE / "flat-artwork.txt"
    known = dict(line.rsplit(" ", 1) for line in cache.read_text().splitlines()) \
        if cache.exists() else {}
    if str(path) not in known:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        alpha = img.ndim == 3 and img.shape[2] == 4
        gray = cv2.cvtColor(fit(load_bgr(path)), cv2.COLOR_BGR2GRAY)
        texture = float(np.abs(cv2.Laplacian(gray, cv2.CV_32F)).mean())
        known[str(path)] = str(int(alpha or texture < 2.0))
        with cache.open("a") as f:
            f.write(f"{path} {known[str(path)]}\n")
    return known[str(path)] == "1"


def generated_dark(seed: int) -> np.ndarray:
    """A telescope-like frame: one or a few soft blobs and some stars on a black sky."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.choice([512, 600, 768])), int(rng.choice([512, 640, 800]))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        sx, sy = rng.uniform(0.01, 0.12) * w, rng.uniform(0.01, 0.12) * h
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        blob = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
        img += blob[..., None] * rng.uniform(60, 255, 3)
    for _ in range(int(rng.integers(0, 40))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.circle(img, (x, y), int(rng.integers(1, 3)), tuple(float(c) for c in
                   rng.uniform(80, 255, 3)), -1, cv2.LINE_AA)
    img += rng.normal(0, rng.uniform(0.5, 3), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with",
         "be", "by", "on", "not", "this", "are", "or", "from", "at", "which", "but", "have",
         "dataset", "image", "daemon", "hash", "policy", "quarantine", "duplicate"]


def generated_flat(seed: int) -> np.ndarray:
    """Flat greys and colours, gradients, documents on white, shapes on a plain ground."""
    rng = np.random.default_rng(seed)
    kind = seed % 5
    h, w = int(rng.choice([480, 600, 768, 1000])), int(rng.choice([640, 800, 1024]))
    if kind == 0:  # flat: grey or colour, levels far enough apart to tell by eye
        colour = rng.integers(0, 16, 3) * 16 if seed % 2 else np.full(3, (seed // 10) * 16 % 256)
        return np.full((h, w, 3), colour, np.uint8)
    if kind == 1:  # linear or radial gradient
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if rng.random() < 0.7:
            a = rng.uniform(0, 2 * np.pi)
            t = np.cos(a) * xx / w + np.sin(a) * yy / h
        else:
            t = np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8)
    if kind in (2, 3):  # a document: lines of text on white
        img = np.full((max(h, w), min(h, w), 3), 255, np.uint8)
        y = int(rng.integers(30, 90))
        scale = rng.uniform(0.45, 0.8)
        while y < img.shape[0] - 30:
            if rng.random() < 0.15:
                y += int(40 * scale)
                continue
            line = " ".join(rng.choice(WORDS, int(rng.integers(3, 12))))
            cv2.putText(img, line, (int(rng.integers(20, 60)), y), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, (20, 20, 20), 1, cv2.LINE_AA)
            y += int(34 * scale) + 4
        return img
    # a few flat shapes on a plain ground (icons, diagrams)
    img = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5))
        r = int(rng.integers(min(h, w) // 12, min(h, w) // 4))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r // 2), colour, -1)
    return img


def load_bgr(path: Path) -> np.ndarray:
    """Decode a package image; transparent pixels are composited onto white."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot decode {path}")
    if img.dtype != np.uint8:
        img = (img / 257).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return img


def fit(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    scale = MAX_SIDE / max(h, w)
    if scale >= 1:
        return img
    return cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def corpus(sets: list[str], limit: int | None) -> dict[str, list[tuple[str, Path | int]]]:
    """Per set: (name, source) where source is a file path or a generator seed."""
    found = package_images(fetch_packages())
    out: dict[str, list[tuple[str, Path | int]]] = {}
    for name in sets:
        items: list[tuple[str, Path | int]] = [(f"{name}/{p.parent.name}/{p.name}", p)
                                               for p in found[name]]
        if name == "photos":  # common.py's photo-like generator (bench_hash's pictures)
            items += [(f"photos/generated/{s}", 20_000 + s) for s in range(150)]
        if name == "dark":
            items += [(f"dark/generated/{s}", s) for s in range(100)]
        if name == "flat":
            items += [(f"flat/generated/{s}", 10_000 + s) for s in range(250)]
        out[name] = items[:limit] if limit else items
    return out


def original_pixels(source: Path | int) -> np.ndarray:
    if isinstance(source, Path):
        return fit(load_bgr(source))
    if source >= 20_000:
        w, h = SIZES_SMALL[source % len(SIZES_SMALL)]
        return fit(photo(source, w, h))
    return generated_dark(source) if source < 10_000 else generated_flat(source)


# ---------------------------------------------------------------- transformations


def encode(img: np.ndarray, ext: str = ".jpg", quality: int = 90) -> bytes:
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              ".webp": [cv2.IMWRITE_WEBP_QUALITY, quality], ".png": []}[ext]
    ok, buf = cv2.imencode(ext, img, params)
    assert ok
    return buf.tobytes()


def _scale(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=interp)


def _levels(img: np.ndarray, gain: float, contrast: bool) -> np.ndarray:
    f = img.astype(np.float32)
    f = (f - f.mean()) * gain + f.mean() if contrast else f * gain
    return np.clip(f, 0, 255).astype(np.uint8)


def _watermark(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    h, w = img.shape[:2]
    scale = max(0.4, h / 600)
    cv2.putText(out, "(c) dedupd 2026", (int(w * 0.55), int(h * 0.93)),
                cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, int(scale * 2)),
                cv2.LINE_AA)
    return cv2.addWeighted(out, 0.6, img, 0.4, 0)


def _noise(img: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(img.size)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _screenshot(img: np.ndarray) -> np.ndarray:
    """As seen on a screen and captured: bilinear rescale to 1280 wide, a gamma shift."""
    h, w = img.shape[:2]
    out = cv2.resize(img, (1280, max(1, round(h * 1280 / w))), interpolation=cv2.INTER_LINEAR)
    lut = (255 * (np.arange(256) / 255) ** 0.9).astype(np.uint8)
    return cv2.LUT(out, lut)


def _letterbox(img: np.ndarray, share: float) -> np.ndarray:
    bar = round(img.shape[0] * share)
    return cv2.copyMakeBorder(img, bar, bar, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))


def _crop(img: np.ndarray, share: float) -> np.ndarray:
    h, w = img.shape[:2]
    dy, dx = round(h * share), round(w * share)
    return img[dy:h - dy, dx:w - dx]


Transform = Callable[[np.ndarray], bytes]
TRANSFORMS: dict[str, Transform] = {
    "jpeg q95": lambda i: encode(i, ".jpg", 95),
    "jpeg q75": lambda i: encode(i, ".jpg", 75),
    "jpeg q50": lambda i: encode(i, ".jpg", 50),
    "jpeg q30": lambda i: encode(i, ".jpg", 30),
    "resize 25%": lambda i: encode(_scale(i, 0.25)),
    "resize 50%": lambda i: encode(_scale(i, 0.5)),
    "resize 150%": lambda i: encode(_scale(i, 1.5)),
    "resize 200%": lambda i: encode(_scale(i, 2.0)),
    "png": lambda i: encode(i, ".png"),
    "webp q80": lambda i: encode(i, ".webp", 80),
    "brightness +20%": lambda i: encode(_levels(i, 1.2, False)),
    "brightness -20%": lambda i: encode(_levels(i, 0.8, False)),
    "contrast +20%": lambda i: encode(_levels(i, 1.2, True)),
    "contrast -20%": lambda i: encode(_levels(i, 0.8, True)),
    "blur 2px": lambda i: encode(cv2.GaussianBlur(i, (0, 0), 2)),
    "noise 8": lambda i: encode(_noise(i)),
    "watermark": lambda i: encode(_watermark(i)),
    "grayscale": lambda i: encode(cv2.cvtColor(cv2.cvtColor(i, cv2.COLOR_BGR2GRAY),
                                               cv2.COLOR_GRAY2BGR)),
    "screenshot": lambda i: encode(_screenshot(i), ".png"),
    # geometric: invisible to a plain dHash
    "hflip": lambda i: encode(cv2.flip(i, 1)),
    "vflip": lambda i: encode(cv2.flip(i, 0)),
    "rotate 90": lambda i: encode(cv2.rotate(i, cv2.ROTATE_90_CLOCKWISE)),
    "rotate 180": lambda i: encode(cv2.rotate(i, cv2.ROTATE_180)),
    "rotate 270": lambda i: encode(cv2.rotate(i, cv2.ROTATE_90_COUNTERCLOCKWISE)),
    "letterbox 10%": lambda i: encode(_letterbox(i, 0.10)),
    "crop 5%": lambda i: encode(_crop(i, 0.05)),
}
NAMES = list(TRANSFORMS)
GEOMETRIC = {"hflip", "vflip", "rotate 90", "rotate 180", "rotate 270", "letterbox 10%",
             "crop 5%"}
DIHEDRAL = {"hflip", "vflip", "rotate 90", "rotate 180", "rotate 270"}
NON_GEOMETRIC = [n for n in NAMES if n not in GEOMETRIC]


# ---------------------------------------------------------------- features

SIG = signature.SIGNATURE_BYTES
RECIPE_V1 = Recipe(version=1)


def decoded(data: bytes) -> np.ndarray:
    """The file decoded exactly as dedupd's default recipe decodes it (before anything
    dedupd.hashing.hash_gray does), PNG-packed: kept, so a change of the hash or the
    signature is measured again in seconds, without encoding and decoding 30k files."""
    fmt = sniff_format(data[:16])
    width, height = image_size(data, fmt)  # type: ignore[arg-type, misc]
    flag = decode_flag(fmt, width, height, Recipe())  # type: ignore[arg-type]
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    return np.frombuffer(cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1],
                         np.uint8)


def decode_file(data: bytes) -> dict[str, object]:
    """What does not change with dedupd's hash: imagehash's hashes (PIL full decode), and
    the decode that dedupd's hashes are computed from."""
    import imagehash
    from PIL import Image

    pil = Image.open(io.BytesIO(data))
    pil.load()
    return {"phash": int(str(imagehash.phash(pil)), 16),
            "idhash": int(str(imagehash.dhash(pil)), 16), "gray": decoded(data)}


def decode_original(job: tuple[str, Path | int]) -> dict[str, object] | None:
    name, source = job
    try:
        img = original_pixels(source)
    except ValueError as exc:
        print(f"skipped {name}: {exc}", file=sys.stderr)
        return None
    out = {"name": name, "orig": decode_file(encode(img, ".jpg", 95)), "copies": {}}
    for t, fn in TRANSFORMS.items():
        out["copies"][t] = decode_file(fn(img))
    return out


def decodes(set_name: str, items: list[tuple[str, Path | int]], jobs: int) -> dict[str, object]:
    """The set's originals and copies, encoded, imagehashed and decoded once (cached)."""
    path = CACHE / f"decoded-v{DECODED_VERSION}-{set_name}-{len(items)}.pkl"
    if path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    t0 = time.time()
    with Pool(jobs) as pool:
        done = [r for r in pool.imap(decode_original, items, chunksize=2) if r]
    out: dict[str, object] = {"names": np.array([d["name"] for d in done])}
    for key in ("phash", "idhash"):
        out[key] = np.array([d["orig"][key] for d in done], np.uint64)
        out["c_" + key] = np.array([[d["copies"][t][key] for t in NAMES] for d in done],
                                   np.uint64)
    out["grays"] = [[d["orig"]["gray"]] + [d["copies"][t]["gray"] for t in NAMES]
                    for d in done]
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.rename(path)
    print(f"{set_name}: {len(done)} originals x {len(NAMES)} copies encoded and decoded in "
          f"{time.time() - t0:.0f} s", flush=True)
    return out


def describe_gray(packed: np.ndarray, variants: bool) -> dict[str, object]:
    """dedupd's hashes and signatures of one decoded file: the v1 recipe, and the default
    one with its flips and rotations when asked (dedupd.hashing's own code)."""
    gray = cv2.imdecode(packed, cv2.IMREAD_UNCHANGED)
    v1, v1sig, _ = hash_gray(gray, RECIPE_V1)
    recipe = Recipe()
    v2, sig, small = hash_gray(gray, recipe)
    entries = [(v2, sig)]
    if variants:
        hashed = ImageHash(v2, recipe, 0, 0, None, 0, "jpeg", (), sig, small)
        entries += [(h, sign()) for _, h, sign in hashed.variants()]
    return {"v1": v1, "v1sig": np.frombuffer(v1sig.to_bytes(), np.uint8),  # type: ignore[union-attr]
            "h8": np.array([h for h, _ in entries], np.uint64),
            "sig": np.stack([np.frombuffer(s.to_bytes(), np.uint8) for _, s in entries])}


def describe_original(grays: list[np.ndarray]) -> dict[str, object]:
    return {"orig": describe_gray(grays[0], True),
            "copies": {t: describe_gray(g, t in GEOMETRIC) for t, g in zip(NAMES, grays[1:],
                                                                             strict=True)}}


def features(sets: dict[str, list[tuple[str, Path | int]]], jobs: int
             ) -> dict[str, dict[str, np.ndarray]]:
    """Per set, arrays for the N originals (v1, phash, idhash, v1sig; h8 and sig for the
    8 flips/rotations, identity first) and for their copies (c_*, one more axis: T).
    dedupd's own hashes are computed afresh on every run, from the cached decodes."""
    out = {}
    for set_name, items in sets.items():
        dec = decodes(set_name, items, jobs)
        t0 = time.time()
        with Pool(jobs) as pool:
            done = pool.map(describe_original, dec["grays"], chunksize=8)
        n, nt = len(done), len(NAMES)
        arr: dict[str, np.ndarray] = {k: v for k, v in dec.items() if k != "grays"}
        arr["v1"] = np.array([d["orig"]["v1"] for d in done], np.uint64)
        arr["c_v1"] = np.array([[d["copies"][t]["v1"] for t in NAMES] for d in done],
                               np.uint64)
        arr["v1sig"] = np.stack([d["orig"]["v1sig"] for d in done])
        arr["c_v1sig"] = np.stack([[d["copies"][t]["v1sig"] for t in NAMES] for d in done])
        arr["h8"] = np.stack([d["orig"]["h8"] for d in done])
        arr["sig"] = np.stack([d["orig"]["sig"] for d in done])
        arr["c_h8"] = np.zeros((n, nt, 8), np.uint64)
        arr["c_sig"] = np.zeros((n, nt, 8, SIG), np.uint8)
        for i, d in enumerate(done):
            for j, t in enumerate(NAMES):
                c = d["copies"][t]  # identity only for non-geometric: broadcast to all 8
                arr["c_h8"][i, j], arr["c_sig"][i, j] = c["h8"], c["sig"]
        print(f"{set_name}: dedupd hashes of {n} x {nt + 1} decodes in "
              f"{time.time() - t0:.1f} s", flush=True)
        out[set_name] = arr
    return out


# ---------------------------------------------------------------- signatures


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int32)


Signatures = signature.Signatures.from_raw
RADIUS = signature.search_radius(DEFAULT_D)


def metrics(a: signature.Signatures, ia: tuple, b: signature.Signatures, ib: tuple
            ) -> dict[str, np.ndarray]:
    """signature.metrics of a[ia] against b[ib]."""
    return signature.metrics(a[ia], b[ib])


def confirmed(m: dict[str, np.ndarray], distance: np.ndarray | int,
              max_distance: int = DEFAULT_D) -> np.ndarray:
    """The second look's verdict (signature.accepts), for candidates `distance` apart."""
    return signature.accepts(m, distance, max_distance)


def self_check(arr: dict[str, np.ndarray]) -> None:
    """The vectorised comparison must say what dedupd says for one pair, pair for pair."""
    raw = arr["sig"][:, 0]
    sigs = Signatures(raw)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(raw), (2, 200))
    dist = rng.integers(0, RADIUS + 1, 200)
    fast = confirmed(metrics(sigs, (i,), sigs, (j,)), dist)
    for k in range(len(i)):
        a, b = (signature.Signature.from_bytes(raw[x].tobytes()) for x in (i[k], j[k]))
        assert fast[k] == signature.confirms(a, b, DEFAULT_D, int(dist[k])), (i[k], j[k])


# ---------------------------------------------------------------- analysis


# One artwork under several names (checked by eye on the contact sheets): the same
# picture to a grayscale hash, and to a person, so never counted as a distinct pair.
# Ubuntu MATE's wallpaper in four colourings; Lomiri ships Ubuntu's warty background
# twice, under two names.
ONE_ARTWORK = [re.compile(r"Ubuntu-Mate-(Cold|Dark|Radioactive|Warm)-no-logo"),
               re.compile(r"lomiri-default-background|warty-final-ubuntu")]


def distinct_pairs(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j of originals, less two names of one artwork."""
    i, j = np.triu_indices(len(names), 1)
    family = np.array([next((k for k, f in enumerate(ONE_ARTWORK) if f.search(str(n))), -1)
                       for n in names])
    keep = (family[i] < 0) | (family[i] != family[j])
    return i[keep], j[keep]


def report(set_name: str, arr: dict[str, np.ndarray]) -> dict[str, object]:
    n, nt = len(arr["names"]), len(NAMES)
    pair_i, pair_j = distinct_pairs(arr["names"])
    pairs = len(pair_i)
    orig, copies = Signatures(arr["sig"]), Signatures(arr["c_sig"])     # (N, 8), (N, T, 8)
    v1o, v1c = Signatures(arr["v1sig"]), Signatures(arr["c_v1sig"])     # (N,), (N, T)
    print(f"\n=== {set_name}: {n} originals, {nt} copies each, {pairs:,} distinct pairs; "
          f"{(orig.info[:, 0] < signature.LOW_INFORMATION).mean():.0%} low_information ===")
    # --- recall per transformation at the default threshold
    stored = (np.repeat(np.arange(n)[:, None], nt, 1), np.zeros((n, nt), int))
    d_var = popcount(arr["c_h8"] ^ arr["h8"][:, None, 0:1])                 # (N, T, 8)
    ok_var = np.zeros(d_var.shape, bool)
    for v in range(8):
        ok_var[..., v] = (d_var[..., v] <= RADIUS) & confirmed(
            metrics(copies, (slice(None), slice(None), v), orig, stored), d_var[..., v])
    d_v1 = popcount(arr["c_v1"] ^ arr["v1"][:, None])
    v1_ok = (d_v1 <= RADIUS) & confirmed(metrics(v1c, (slice(None), slice(None)), v1o,
                                                 stored[:1]), d_v1)
    rec = {
        "v1": (d_v1 <= DEFAULT_D).mean(0),
        "imagehash phash": (popcount(arr["c_phash"] ^ arr["phash"][:, None])
                            <= DEFAULT_D).mean(0),
        "imagehash dhash": (popcount(arr["c_idhash"] ^ arr["idhash"][:, None])
                            <= DEFAULT_D).mean(0),
        "v1+look": v1_ok.mean(0),
        "v2": (d_var[..., 0] <= DEFAULT_D).mean(0),
        "v2+look": ok_var[..., 0].mean(0),
        "+flips": ok_var.any(-1).mean(0),
    }
    cols = list(rec)
    print(f"\nrecall at d <= {DEFAULT_D}: v1 = the v1 recipe's hash alone; v2 = borders "
          f"trimmed (dedupd's default recipe), hash alone; +look = candidates within "
          f"{RADIUS} that the second look confirms (strictly beyond {DEFAULT_D}); +flips = "
          "also as the copy's 7 flips/rotations")
    print(f"{'transformation':<19}" + "".join(f"{c:>16}" for c in cols))
    for j, t in enumerate(NAMES):
        print(f"{t:<19}" + "".join(f"{rec[c][j]:>16.3f}" for c in cols))
    ng = [NAMES.index(t) for t in NON_GEOMETRIC]
    print(f"{'non-geometric mean':<19}" + "".join(f"{rec[c][ng].mean():>16.3f}" for c in cols))
    # --- false pairs among distinct originals
    i, j = pair_i, pair_j
    dv1 = popcount(arr["v1"][i] ^ arr["v1"][j])
    dph = popcount(arr["phash"][i] ^ arr["phash"][j])
    did = popcount(arr["idhash"][i] ^ arr["idhash"][j])
    dv2 = popcount(arr["h8"][i, 0] ^ arr["h8"][j, 0])
    # with flips: any variant of one (the newcomer) against the other as stored
    dfl = popcount(arr["h8"][i, :] ^ arr["h8"][j, 0:1])
    reach = signature.search_radius(12)

    def looked(dist: np.ndarray, a: signature.Signatures, ia: tuple, ib: tuple
               ) -> list[np.ndarray]:
        """Per threshold d = 0..12: which pairs the second look would call duplicates."""
        near = np.flatnonzero(dist <= reach)
        m = metrics(a, tuple(x[near] for x in ia), orig, tuple(x[near] for x in ib))
        out = []
        for d in range(13):
            hit = np.zeros(len(dist), bool)
            hit[near] = (dist[near] <= signature.search_radius(d)) & confirmed(m, dist[near], d)
            out.append(hit)
        return out

    zero = np.zeros(len(i), int)
    near1 = np.flatnonzero(dv1 <= reach)
    m1 = metrics(v1o, (i[near1],), v1o, (j[near1],))
    look_v2 = looked(dv2, orig, (i, zero), (j, zero))
    look_fl = [looked(dfl[:, v], orig, (i, zero + v), (j, zero)) for v in range(8)]
    fp = {"v1": dv1, "imagehash phash": dph, "imagehash dhash": did}
    print(f"\nfalse pairs among {pairs:,} distinct pairs at d = 0..12 (+look: candidates "
          "within signature.search_radius(d) that the second look confirms)")
    print(f"{'d':>3}" + "".join(f"{c:>16}" for c in cols))
    fp_rows = []
    for d in range(13):
        v1_hit = np.zeros(len(i), bool)
        v1_hit[near1] = (dv1[near1] <= signature.search_radius(d)) & confirmed(
            m1, dv1[near1], d)
        row = [(v <= d).sum() for v in fp.values()]
        row += [v1_hit.sum(), (dv2 <= d).sum(), look_v2[d].sum(),
                np.any([look_fl[v][d] for v in range(8)], 0).sum()]
        fp_rows.append(row)
        print(f"{d:>3}" + "".join(f"{x:>16}" for x in row))
    at = fp_rows[DEFAULT_D]
    print(f"{'FPR':>3}" + "".join(f"{x / pairs:>16.1e}" for x in at) + f"   (d <= {DEFAULT_D})")
    close = np.unique(np.concatenate([i[dv1 <= DEFAULT_D], j[dv1 <= DEFAULT_D]]))
    print(f"images with an unrelated one within {DEFAULT_D} bits: v1 {len(close) / n:.1%}")
    # --- what the second look decides, and why recall is lost
    cand = d_var[:, ng, 0] <= RADIUS
    kept = ok_var[:, ng, 0]
    print(f"\nnon-geometric copies: {(d_var[:, ng, 0] <= DEFAULT_D).mean():.3f} within "
          f"{DEFAULT_D} bits, {cand.mean():.3f} within {RADIUS}, {kept.mean():.3f} confirmed; "
          f"missed by the hash (> {RADIUS} bits): {(~cand).sum()}, refused by the second "
          f"look: {(cand & ~kept).sum()}")
    hist = np.bincount(np.minimum(d_var[:, ng, 0][~kept], 16), minlength=17)
    print("missed copies by 64-bit distance: " + ", ".join(
        f"{d}: {c}" for d, c in enumerate(hist) if c) + " (16 = 16 or more)")
    worst = np.argsort(-(~ok_var[:, ng, 0]).sum(1))[:6]
    print("originals missing most copies: " + ", ".join(
        f"{arr['names'][w]} ({(~ok_var[w, ng, 0]).sum()})" for w in worst
        if (~ok_var[w, ng, 0]).any()))
    look = look_v2[DEFAULT_D]
    return {"recall": rec, "fp": fp_rows, "pairs": (i, j, dv1, dv2, look)}


def contact_sheet(set_name: str, arr: dict[str, np.ndarray], sources: dict[str, Path | int],
                  i: np.ndarray, j: np.ndarray, dist: np.ndarray, label: str, count: int = 24
                  ) -> Path:
    """The `count` pairs with the smallest `dist`, side by side, for a look by eye."""
    order = np.argsort(dist, kind="stable")[:count]
    tiles = []
    for k in order:
        a, b = (original_pixels(sources[str(arr["names"][x])]) for x in (i[k], j[k]))
        pair = [cv2.resize(x, (160, 120), interpolation=cv2.INTER_AREA) for x in (a, b)]
        tile = np.hstack([pair[0], np.full((120, 4, 3), 255, np.uint8), pair[1]])
        cv2.putText(tile, f"d={dist[k]}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 255), 1, cv2.LINE_AA)
        tiles.append(cv2.copyMakeBorder(tile, 4, 4, 4, 4, cv2.BORDER_CONSTANT,
                                        value=(90, 90, 90)))
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.vstack([np.hstack(tiles[r:r + 4]) for r in range(0, len(tiles), 4)])
    out = CACHE / "sheets" / f"{set_name}-{label}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), sheet)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="photos,dark,flat")
    ap.add_argument("--limit", type=int, help="originals per set (quick runs)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sheets", action="store_true", help="write contact sheets")
    args = ap.parse_args()
    print(machine())
    sets = corpus(args.sets.split(","), args.limit)
    feats = features(sets, args.jobs)
    for name, arr in feats.items():
        self_check(arr)
        res = report(name, arr)
        if args.sheets:
            sources = dict(sets[name])
            i, j, dv1, dv2, look = res["pairs"]
            for label, dist in (("closest-v1", dv1), ("closest-v2", dv2),
                                ("confirmed-v2", np.where(look, dv2, 99))):
                print(f"contact sheet: {contact_sheet(name, arr, sources, i, j, dist, label)}")


if __name__ == "__main__":
    main()
