"""How long the daemon waits before judging a file, and when it says something again.

- `unfinished_seconds`: a file that looks short or broken and whose writer never closed it
  is judged only once unchanged this long (a writer may pause). It was a 60 s constant.
- An unreadable directory is one line, once; but once it was readable again and is then
  unreadable again, that is news: one more line (it was said once per process lifetime).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, wait_for
from test_daemon import encode


def test_unfinished_seconds_is_how_long_an_unclosed_short_file_waits(setup,
                                                                    tmp_path: Path) -> None:
    cfg, root, db, _ = setup(unfinished_seconds=1.5)
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    head = encode(photo(7, 320, 240))[:150]  # a writer stalled after 150 bytes
    path = root / "stalled.jpg"
    try:
        with open(path, "wb") as fh:
            fh.write(head)
            fh.flush()
            started = time.monotonic()
            wait_for(lambda: f"{path}: " in daemon.log() and "image_rejected" in daemon.log(),
                     20, "the stalled file judged after unfinished_seconds")
            waited = time.monotonic() - started
        assert 1.5 <= waited < 15, waited
        assert "Traceback" not in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_an_unreadable_directory_is_said_again_after_it_was_readable(setup,
                                                                    tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_DAC_OVERRIDE with setpriv")
    cfg, root, db, _ = setup(reconcile_interval=0.5)
    locked = root / "locked"
    write_image(locked / "inside.jpg", photo(41, 64, 48))
    locked.chmod(0)
    no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log", prefix=no_dac).start()
    said = f"{locked}: cannot read this directory"
    try:
        wait_for(lambda: said in daemon.log(), 30, "reported")
        locked.chmod(0o755)
        wait_for(lambda: f"{locked}: readable again" in daemon.log(), 30,
                 "the directory readable again, said once")
        locked.chmod(0)
        wait_for(lambda: daemon.log().count(said) == 2, 30, "reported again")
        reconciled = daemon.log().count("reconciled ")
        wait_for(lambda: daemon.log().count("reconciled ") >= reconciled + 4, 30,
                 "a few more periodic rescans")
        log = daemon.log()
        assert log.count(said) == 2 and log.count(f"{locked}: readable again") == 1, log
        assert "Traceback" not in log and daemon.proc.poll() is None
    finally:
        locked.chmod(0o755)
        assert daemon.stop() == 0
