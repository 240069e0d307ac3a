"""Events reach a real systemd-journald with their MESSAGE_ID, PRIORITY and DEDUPD_* fields."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from daemonproc import wait_for

from dedupd.events import MESSAGE_IDS, PRIORITIES, Event

ROOT = Path(__file__).resolve().parent.parent
JOURNALD = "/lib/systemd/systemd-journald"
SOCKET = Path("/run/systemd/journal/socket")


def _listening(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@pytest.fixture(scope="session")
def journald():
    """A real journald: the running one, or one started here (root, no systemd as PID 1)."""
    if not shutil.which("journalctl") or not os.path.exists(JOURNALD):
        pytest.skip("systemd-journald is not installed (apt-get install systemd)")
    proc = None
    if not _listening(SOCKET):  # absent, or left behind by a journald that has exited
        if os.geteuid() != 0:
            pytest.skip("starting systemd-journald needs root")
        proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(SOCKET), 10, "journald's socket")
    yield
    if proc is not None:
        proc.terminate()
        proc.wait(10)


def journal_entries(field: str, value: str) -> list[dict]:
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", f"{field}={value}"],
                         capture_output=True, text=True, timeout=30)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


EMITTER = """
import sys
from dedupd.events import Event, emit, emit_summary, setup_logging
setup_logging(sys.argv[1], "debug")
tag = sys.argv[2]
for event in Event:
    if event is not Event.SUMMARY:
        emit(event, f"{event.value} {tag}", path=f"/data/{tag}/{event.value}.jpg",
             match=f"/data/{tag}/orig.jpg", distance=3, action="quarantine",
             quarantine_path=f"/q/{tag}.jpg", hash="00ff00ff00ff00ff", policy="default",
             root=f"/data/{tag}", run=tag)
emit_summary()
"""


def run_emitter(mode: str, tag: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", EMITTER, mode, tag], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **env})


def test_every_event_kind_arrives_in_journald_with_fields(journald) -> None:
    tag = uuid.uuid4().hex
    proc = run_emitter("journald", tag)
    assert proc.returncode == 0, proc.stderr
    entries = wait_for(lambda: (e := journal_entries("DEDUPD_RUN", tag)) and
                       len(e) >= len(Event) - 1 and e, 20, "entries in the journal")
    summaries = wait_for(lambda: [e for e in journal_entries(
        "MESSAGE_ID", MESSAGE_IDS[Event.SUMMARY]) if tag in str(e.get("_CMDLINE"))], 20,
        "the summary entry")  # the summary has no per-event fields: found by its sender
    by_event = {e["DEDUPD_EVENT"]: e for e in entries + summaries}
    assert set(by_event) == {e.value for e in Event}
    for event in Event:
        entry = by_event[event.value]
        assert entry["MESSAGE_ID"] == MESSAGE_IDS[event]
        assert entry["PRIORITY"] == str(PRIORITIES[event])
        assert entry["SYSLOG_IDENTIFIER"] == "dedupd"
        if event is not Event.SUMMARY:
            assert entry["DEDUPD_PATH"] == f"/data/{tag}/{event.value}.jpg"
            for field in ("DEDUPD_MATCH", "DEDUPD_DISTANCE", "DEDUPD_ACTION",
                          "DEDUPD_QUARANTINE_PATH", "DEDUPD_HASH", "DEDUPD_POLICY",
                          "DEDUPD_ROOT"):
                assert field in entry, (event, field)
    summary = by_event["summary"]
    assert summary["DEDUPD_COUNT_DUPLICATE_QUARANTINED"] == "1"
    assert summary["DEDUPD_COUNT_IMAGE_REJECTED"] == "1"
    # Query by MESSAGE_ID, as the monitoring recipes in the README do.
    quarantined = journal_entries("MESSAGE_ID", MESSAGE_IDS[Event.DUPLICATE_QUARANTINED])
    assert any(e.get("DEDUPD_RUN") == tag for e in quarantined)


def test_json_mode_one_object_per_line() -> None:
    proc = run_emitter("json", "j1")
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert {o["event"] for o in lines} == {e.value for e in Event}
    q = next(o for o in lines if o["event"] == "duplicate_quarantined")
    assert q["message_id"] == MESSAGE_IDS[Event.DUPLICATE_QUARANTINED]
    assert (q["path"], q["distance"], q["priority"]) == ("/data/j1/duplicate_quarantined.jpg",
                                                         3, 5)


def test_stderr_mode_is_human_and_auto_picks_journald_under_systemd(journald) -> None:
    proc = run_emitter("stderr", "h1")
    assert "dedupd: duplicate_quarantined: duplicate_quarantined h1" in proc.stderr
    assert "<crit> circuit_open" in proc.stderr
    tag = uuid.uuid4().hex
    auto = run_emitter("auto", tag, INVOCATION_ID="0" * 32)
    assert auto.stderr == ""
    wait_for(lambda: journal_entries("DEDUPD_RUN", tag), 20, "auto mode to use journald")


def test_catalog_covers_every_message_id() -> None:
    text = (ROOT / "deploy" / "dedupd.catalog").read_text()
    ids = set(re.findall(r"^-- ([0-9a-f]{32})$", text, re.M))
    assert ids == set(MESSAGE_IDS.values())
    for block in text.split("\n-- ")[1:]:
        assert "Subject:" in block and "Defined-By: dedupd" in block
