"""The floor: a bare loop over OpenCV's 1/8 reduced grayscale JPEG decode plus an area
resize, nothing else (no checks, no digest). JPEG entropy decoding sets this cost; the
product's CLI should add nothing measurable on top. `python ref_floor.py FILE...`

The bytes are read first and decoded from memory: in this OpenCV build `cv2.imread(path,
flag)` is measurably slower than `imdecode` of the same bytes, and a floor must be the
fastest bare form.
"""

import sys

import cv2
import numpy as np

if __name__ == "__main__":
    for p in sys.argv[1:]:
        gray = cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
        small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA)
        bits = np.packbits((small[:, 1:] > small[:, :-1]).ravel(), bitorder="little")
        print(f"{int.from_bytes(bits.tobytes(), 'little'):016x}  {p}")
