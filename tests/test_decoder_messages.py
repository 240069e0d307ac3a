"""Decoder capture must not swallow what other C code writes to fd 2 (#12).

While decoder capture is on (every CLI process, the daemon included), fd 2 pointed at a
memfd for the whole process lifetime: libpq notices, glibc's messages, anything else
written to fd 2 by C code was dropped. Here a thread writes to fd 2 with write(2), as C
code does, between and during decodes that warn and decodes that do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import photo, write_image
from test_abuse import jpeg_with_extraneous_bytes

FOREIGN = """
import os, sys, threading, time
from dedupd.decoder_messages import DECODER_MESSAGES
from dedupd.hashing import hash_file
DECODER_MESSAGES.enabled = True
files = sys.argv[1:]
hash_file(files[-1])  # capture installed (the old design: for good)
os.write(2, b"idle: said by other C code\\n")
wrong, done = [], threading.Event()
def work():
    for _ in range(10):
        for f in files:
            said = hash_file(f).warnings
            if bool(said) != ("/warn" in f):
                wrong.append((f, said))
def other_c_code():
    n = 0
    while not done.is_set():
        os.write(2, b"busy %d: said by other C code\\n" % n)
        n += 1
        time.sleep(0.002)
    print(n)
threads = [threading.Thread(target=work) for _ in range(3)]
talker = threading.Thread(target=other_c_code)
talker.start()
for t in threads: t.start()
for t in threads: t.join()
done.set()
talker.join()
print(len(wrong))
"""


def test_other_c_codes_stderr_is_kept_while_decoders_are_captured(tmp_path: Path) -> None:
    files = [str(jpeg_with_extraneous_bytes(tmp_path / f"warn{i}.jpg", i)) for i in range(2)]
    files += [str(write_image(tmp_path / f"clean{i}.jpg", photo(20 + i, 160, 120)))
              for i in range(4)]
    proc = subprocess.run([sys.executable, "-c", FOREIGN, *files], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    written, wrong = (int(n) for n in proc.stdout.split())
    assert wrong == 0  # decoder words still go with their file
    lines = proc.stderr.splitlines()
    assert "idle: said by other C code" in lines
    busy = [line for line in lines if line.startswith("busy ")]
    assert sorted(busy, key=lambda line: int(line.split()[1].rstrip(":"))) == \
        [f"busy {n}: said by other C code" for n in range(written)]
    assert len(lines) == 1 + written, [line for line in lines if "other C code" not in line]
