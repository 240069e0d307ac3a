"""The seed recipe as a user's script would run it: full colour decode, BGR2GRAY, default
(bilinear) resize, bits summed in Python. `python ref_seed.py FILE...` prints HEX  PATH."""

import sys

import cv2


def dhash(path: str, size: int = 8) -> int:
    image = cv2.imread(path)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    resized = cv2.resize(gray, (size + 1, size))
    diff = resized[:, 1:] > resized[:, :-1]
    return sum(2**i for i, v in enumerate(diff.flatten()) if v)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"{dhash(p):016x}  {p}")
