"""dedupd: keep image datasets free of perceptual duplicates."""

import os

# dedupd never multiplies matrices, but numpy's OpenBLAS starts a thread per core at
# import, which costs ~80 ms of CPU per process (a tenth of a second on every `dedupd
# hash`, and on each scan worker). One BLAS thread unless the user asked otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
