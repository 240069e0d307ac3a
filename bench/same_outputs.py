"""Do two dedupd trees hash and sign images byte-identically? A speed-up of hashing.py
or signature.py must not change one stored bit (hashes and signatures already in a
dictionary are compared with new ones), so check it against the tree before:

    git archive HEAD dedupd | tar -x -C /tmp/before      # before the change
    ./dev shell; python bench/same_outputs.py /tmp/before [--images 800]

Each tree runs in its own process over the same generated images (photos, letterboxed
and padded photos, blobs on black, gradients, faint textures, flat images; 8 to 2,600
pixels a side; JPEG at quality 30-95 and PNG) with the recipes v2, v1, size 16 and full
decode: the 64-bit hash, the signature's bytes, the reduced image, and for every fifth
image its 7 flips' hashes and signatures. Prints the number compared and exits 1 at the
first difference, naming the image.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent


def images(count: int) -> Iterator[tuple[str, object]]:
    """(name, BGR image) of every kind the second look treats apart, sizes at random."""
    import cv2
    import numpy as np

    from dedupd.demo import synthetic_photo

    rng = np.random.default_rng(12345)
    for seed in range(count):
        w, h = int(rng.integers(8, 2600)), int(rng.integers(8, 2000))
        kind = ("photo", "photo", "bars", "blob", "gradient", "faint", "flat")[seed % 7]
        if kind in ("photo", "bars"):
            img = synthetic_photo(seed, w, h)
            if kind == "bars":
                bars = [int(v) for v in rng.integers(0, max(2, min(w, h) // 4), 4)]
                img = cv2.copyMakeBorder(img, *bars, cv2.BORDER_CONSTANT,
                                         value=(255,) * 3 if seed % 2 else (0,) * 3)
        elif kind == "blob":
            img = np.zeros((h, w, 3), np.uint8)
            axes = (max(1, w // int(rng.integers(4, 12))), max(1, h // int(rng.integers(4, 12))))
            cv2.ellipse(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), axes,
                        float(rng.uniform(0, 180)), 0, 360,
                        tuple(int(c) for c in rng.integers(60, 256, 3)), -1, cv2.LINE_AA)
            img = cv2.GaussianBlur(img, (0, 0), 2.5)
        elif kind == "gradient":
            lo, hi = float(rng.integers(0, 120)), float(rng.integers(120, 256))
            img = cv2.merge([np.tile(np.linspace(lo, hi, w, dtype=np.float32),
                                     (h, 1)).astype(np.uint8)] * 3)
        elif kind == "faint":
            field = cv2.resize(rng.normal(0, 1.5, (12, 16)).astype(np.float32), (w, h),
                               interpolation=cv2.INTER_CUBIC)
            img = cv2.merge([np.clip(128 + field, 0, 255).astype(np.uint8)] * 3)
        else:
            img = np.full((h, w, 3), int(rng.integers(0, 256)), np.uint8)
        quality = int(rng.integers(30, 96))
        for ext, params in ((".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]), (".png", [])):
            yield f"{seed} {kind} {w}x{h}{ext}", cv2.imencode(ext, img, params)[1].tobytes()


def outputs(count: int) -> list[tuple[str, object]]:
    """What this process's dedupd makes of every image, per recipe."""
    from dedupd.hashing import Recipe, hash_bytes

    recipes = (Recipe(), Recipe(version=1), Recipe(size=16), Recipe(decode="full"))
    out: list[tuple[str, object]] = []
    for n, (name, data) in enumerate(images(count)):
        for recipe in recipes:
            h = hash_bytes(data, recipe)  # type: ignore[arg-type]
            gray = h.gray
            flips = ([(t, v, sign().to_bytes()) for t, v, sign in h.variants()]
                     if n % 10 < 2 else [])
            out.append((f"{name} {recipe.key}",
                        (h.hash, h.signature.to_bytes() if h.signature else None,
                         None if gray is None else (gray.shape, gray.tobytes()), flips)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a dedupd tree (the directory holding dedupd/)")
    parser.add_argument("after", nargs="?", default=str(HERE.parent),
                        help="another tree (default: this one)")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # internal: one tree's outputs
    args = parser.parse_args()
    if args.dump:
        import dedupd  # from PYTHONPATH: the tree under test, not the installed one

        assert dedupd.__file__.startswith(args.before), (dedupd.__file__, args.before)
        with open(args.dump, "wb") as fh:
            pickle.dump(outputs(args.images), fh)
        return 0
    results = []
    for tree in (os.path.abspath(args.before), os.path.abspath(args.after)):
        dump = Path(os.environ.get("TMPDIR", "/tmp")) / f"same-outputs-{os.getpid()}.pkl"
        subprocess.run([sys.executable, __file__, tree, "--images", str(args.images),
                        "--dump", str(dump)], env={**os.environ, "PYTHONPATH": tree},
                       check=True)
        results.append(pickle.loads(dump.read_bytes()))
        dump.unlink()
    before, after = results
    for (name, old), (_, new) in zip(before, after, strict=True):
        if old != new:
            print(f"DIFFERENT: {name}")
            return 1
    digest = hashlib.sha256(pickle.dumps(after)).hexdigest()[:16]
    print(f"identical: {len(after)} results ({args.images} images x 2 formats x 4 recipes), "
          f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
