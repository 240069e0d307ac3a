"""journald going away and coming back under a running daemon (a real systemd-journald).

The daemon and a private systemd-journald run in their own mount namespaces, where
/run/systemd/journal is a directory of this test (and the journal files land in another):
stopping that journald makes the daemon's journal socket refuse connections, as while the
system's journald restarts on an upgrade, without disturbing anyone else's logging.
(PostgreSQL going away and coming back: tests/test_postgres.py, on a private cluster.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import photo
from daemonproc import DaemonProcess, records, wait_for, write_config
from test_daemon import encode, near_copy

JOURNALD = "/lib/systemd/systemd-journald"


def in_namespace(*binds: tuple[Path, str]) -> list[str]:
    """A command prefix: run in a private mount namespace with `binds` mounted first."""
    mounts = " && ".join(f"mkdir -p {target} && mount --bind {source} {target}"
                         for source, target in binds)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"',
            "sh"]


class PrivateJournald:
    """A real systemd-journald whose socket directory and journal files are ours."""

    def __init__(self, base: Path) -> None:
        self.run, self.store = base / "journal-run", base / "journal-files"
        self.run.mkdir(parents=True)
        self.store.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binds = [(self.run, "/run/systemd/journal"), (self.store, "/run/log/journal")]
        if Path("/var/log/journal").is_dir():  # persistent storage: keep it ours too
            binds.append((self.store, "/var/log/journal"))
        self.proc = subprocess.Popen([*in_namespace(*binds), JOURNALD],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.listening() or self.proc.poll() is not None, 20,
                 "journald's socket")
        assert self.proc.poll() is None, "the private journald exited"

    def listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(str(self.run / "socket"))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """journald goes away: its socket stays, and refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def events(self) -> list[dict]:
        out = subprocess.run(["journalctl", "-D", str(self.store), "--no-pager", "-o", "json",
                              "SYSLOG_IDENTIFIER=dedupd"], capture_output=True, text=True,
                             timeout=30)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def decided(self, path: Path) -> bool:
        return any(e.get("DEDUPD_PATH") == str(path) and e.get("DEDUPD_EVENT") in (
            "image_accepted", "duplicate_quarantined") for e in self.events())


@pytest.fixture
def journald(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("a private journald in its own mount namespace needs root")
    if not (os.path.exists(JOURNALD) and shutil.which("journalctl") and shutil.which("unshare")):
        pytest.skip("needs systemd-journald, journalctl and unshare (apt-get install systemd)")
    jd = PrivateJournald(tmp_path)
    jd.start()
    yield jd
    jd.stop()


def test_journald_goes_away_and_comes_back_under_a_running_daemon(journald, tmp_path) -> None:
    root, db = tmp_path / "data", tmp_path / "state" / "index.sqlite"
    root.mkdir()
    cfg = write_config(tmp_path / "dedupd.yaml", {
        "index": str(db), "quarantine_dir": str(tmp_path / "q"), "settle_seconds": 0.5,
        "watches": [{"path": str(root)}], "policies": {"default": {"max_distance": 6}},
        "metrics": {"textfile": str(tmp_path / "dedupd.prom")}})
    daemon = DaemonProcess(cfg, tmp_path / "stderr.log", log_mode="journald",
                           prefix=in_namespace((journald.run, "/run/systemd/journal")))
    daemon.start(wait_ready=False)
    try:
        wait_for(lambda: any(e.get("DEDUPD_EVENT") == "started" for e in journald.events())
                 or daemon.proc.poll() is not None, 60, "the daemon to start")
        img = photo(7, 320, 240)
        (root / "a.jpg").write_bytes(encode(img))
        wait_for(lambda: journald.decided(root / "a.jpg"), 30, "a.jpg's decision in journald")

        journald.stop()
        (root / "b.jpg").write_bytes(encode(photo(8, 320, 240)))  # kept
        (root / "c.jpg").write_bytes(near_copy(img, 0))  # a duplicate of a.jpg
        wait_for(lambda: str(root / "b.jpg") in records(db) and not (root / "c.jpg").exists(),
                 30, "files decided while journald is away")
        assert daemon.proc.poll() is None, daemon.log()
        # The decisions are not lost: they went to stderr (systemd captures it) meanwhile.
        def on_stderr(name: str, verdict: str) -> bool:
            return any(name in line and verdict in line for line in daemon.log().splitlines())

        wait_for(lambda: on_stderr("b.jpg", "accepted") and on_stderr("c.jpg", "quarantined"),
                 30, "decisions made while journald was away, on stderr")

        journald.start()  # journald is back: the daemon logs to it again
        (root / "d.jpg").write_bytes(encode(photo(9, 320, 240)))
        wait_for(lambda: journald.decided(root / "d.jpg"), 30, "d.jpg's decision in journald")
    finally:
        code = daemon.stop()
    assert code == 0
    assert "Traceback" not in daemon.log(), daemon.log()
    # The metrics say so too: events journald refused went to stderr, none were lost.
    metrics = (tmp_path / "dedupd.prom").read_text()
    fallbacks = re.search(r"^dedupd_log_journal_fallbacks_total (\S+)$", metrics, re.M)
    assert fallbacks is not None and float(fallbacks.group(1)) >= 2, metrics
    assert re.search(r"^dedupd_log_events_dropped_total 0\.0$", metrics, re.M), metrics
