"""What most Python users reach for: `imagehash.dhash` on a PIL image (full decode).
`python ref_imagehash.py FILE...` prints HEX  PATH (imagehash's own bit order)."""

import sys

import imagehash
from PIL import Image

if __name__ == "__main__":
    for p in sys.argv[1:]:
        with Image.open(p) as im:
            print(f"{imagehash.dhash(im)}  {p}")
