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


def journald_listening() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(SOCKET))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def journald():
    """A real journald: the running one, or one started here (root, no systemd as PID 1)."""
    if not shutil.which("journalctl") or not os.path.exists(JOURNALD):
        pytest.skip("systemd-journald is not installed (apt-get install systemd)")
    proc = None
    if not journald_listening():  # absent, or a stale socket left by a journald that exited
        if os.geteuid() != 0:
            pytest.skip("starting systemd-journald needs root")
        proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(journald_listening, 10, "journald's socket")
    yield
    if proc is not None:
        proc.terminate()
        proc.wait(10)


def journal_entries(field: str, value: str) -> list[dict]:
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", f"{field}={value}"],
                         capture_output=True, text=True, timeout=30)
    return [json.loads(line) for line in out.stdout.split("\n") if line.startswith("{")]


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


# ---------------------------------------------------------------- journald going away

# Runs inside `unshare --mount`: tmpfs over the journal's socket and storage directories,
# so this test's own systemd-journald can be stopped and started without touching the
# machine's (or another test's) journal.
PRIVATE_JOURNAL = r"""
import json, os, socket, subprocess, sys, time
for d in ("/run/systemd/journal", "/run/log/journal", "/var/log/journal"):
    if d.startswith("/run") or os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)

def listening():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect("/run/systemd/journal/socket")
        except OSError:
            return False
    return True

def poll(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value

def start_journald():
    proc = subprocess.Popen([sys.argv[1]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(listening, "journald's socket")
    return proc

def stop_journald(proc):
    proc.terminate()
    proc.wait(30)
    assert os.path.exists("/run/systemd/journal/socket")  # stale: connections are refused

def journal(field, value):
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", "-D", "/run/log/journal",
                          f"{field}={value}"], capture_output=True, text=True, timeout=30)
    return [json.loads(line) for line in out.stdout.split("\n") if line.startswith("{")]

exec(sys.argv[2])
"""


def in_private_journal(body: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private journald needs root and unshare(1)")
    if not os.path.exists(JOURNALD) or not shutil.which("journalctl"):
        pytest.skip("systemd-journald is not installed (apt-get install systemd)")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", PRIVATE_JOURNAL, JOURNALD, body], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_events_survive_journald_going_away_and_coming_back() -> None:
    body = r"""
import logging
from dedupd import events
from dedupd.events import Event, emit
proc = start_journald()
events.setup_logging("journald")
emit(Event.IMAGE_ACCEPTED, "before", path="/d/a.jpg", run="t1")
stop_journald(proc)
emit(Event.DUPLICATE_QUARANTINED, "during", path="/d/b.jpg", quarantine_path="/q/b.jpg",
     run="t1")
logging.getLogger("dedupd.test").warning("a log record while journald is down")
emit(Event.STOPPED, "stopped while down", run="t1")
proc = start_journald()
emit(Event.IMAGE_ACCEPTED, "after", path="/d/c.jpg", run="t1")
got = poll(lambda: (e := journal("DEDUPD_RUN", "t1")) and len(e) >= 2 and e, "the journal")
back = journal("SYSLOG_IDENTIFIER", "dedupd")
stop_journald(proc)
print(json.dumps({"journal": sorted(e["MESSAGE"] for e in got),
                  "notes": [e["MESSAGE"] for e in back if "answers again" in e["MESSAGE"]],
                  "delivery": events.delivery()}))
"""
    proc = in_private_journal(body)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["journal"] == ["after", "before"]
    assert result["delivery"] == {"journal_fallbacks": 3, "dropped": 0}
    assert result["notes"] and "3 events went to stderr" in result["notes"][0]
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("<4>dedupd: journald refused an event (Connection refused)")
    during = [json.loads(line[3:]) for line in lines[1:]]  # `<prio>` + the whole event
    assert [(o.get("event"), o["priority"]) for o in during] == [
        ("duplicate_quarantined", 5), (None, 4), ("stopped", 5)]
    assert during[0]["quarantine_path"] == "/q/b.jpg"
    assert during[1]["message"] == "a log record while journald is down"


def test_daemon_runs_and_decides_without_journald(tmp_path: Path, make_photo) -> None:
    """`--log journald` with the journal socket refusing: the daemon starts, logs its
    decisions to stderr, and stops on SIGTERM with status 0 and no traceback."""
    import yaml

    root = tmp_path / "data"
    root.mkdir()
    make_photo("a.jpg", seed=1, root=root)
    make_photo("b.jpg", seed=2, root=root)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump({"index": str(tmp_path / "i.sqlite"),
                                   "quarantine_dir": str(tmp_path / "q"),
                                   "watches": [str(root)], "settle_seconds": 0}))
    body = f"""
import signal
proc = start_journald()
stop_journald(proc)  # the socket stays, refusing connections (journald restarting)
d = subprocess.Popen([sys.executable, "-m", "dedupd", "--config", {str(cfg)!r}, "--log",
                      "journald", "run"], stderr=subprocess.PIPE, text=True)
def catches_sigterm():  # run() installs its handler after start() logged "started"
    with open(f"/proc/{{d.pid}}/status") as fh:
        mask = next(x for x in fh if x.startswith("SigCgt:")).split()[1]
    return int(mask, 16) & (1 << (signal.SIGTERM - 1))
lines, sent = [], False
while (line := d.stderr.readline()):
    lines.append(line)
    text = "".join(lines)
    if not sent and text.count('"image_accepted"') == 2 and '"started"' in text:
        poll(catches_sigterm, "the daemon's SIGTERM handler")
        d.send_signal(signal.SIGTERM)
        sent = True
lines += d.stderr.readlines()
print(json.dumps({{"status": d.wait(60), "stderr": lines}}))
"""
    proc = in_private_journal(body, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    text = "".join(result["stderr"])
    assert result["status"] == 0, text
    assert "Traceback" not in text
    events = [json.loads(line[3:]) for line in result["stderr"] if line.startswith("<")
              and line[3:].startswith("{")]
    kinds = [e.get("event") for e in events]
    assert "started" in kinds and kinds[-1] == "stopped", kinds
    assert kinds.count("image_accepted") == 2


GLUE = """
import sys, threading
from dedupd.events import Event, emit, setup_logging
import logging
setup_logging(sys.argv[1], "debug")
log = logging.getLogger("dedupd.glue")
def burst(tag):
    for i in range(int(sys.argv[2])):
        emit(Event.IMAGE_ACCEPTED, f"{tag} {i}", path=f"/d/{tag}/{i}.jpg")
        if i % 10 == 0:
            log.info("record %s %d", tag, i)
threads = [threading.Thread(target=burst, args=(t,)) for t in ("a", "b")]
for t in threads: t.start()
for t in threads: t.join()
"""


@pytest.mark.parametrize("mode", ["json", "stderr"])
def test_threads_never_glue_two_events_on_one_line(mode: str) -> None:
    n = 10_000
    proc = subprocess.run([sys.executable, "-c", GLUE, mode, str(n)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.decode().split("\n")
    assert lines.pop() == ""
    expected = 2 * n + 2 * n // 10
    assert len(lines) == expected
    if mode == "json":
        objs = [json.loads(line) for line in lines]  # one object per line, nothing glued
        assert sum(o.get("event") == "image_accepted" for o in objs) == 2 * n
    else:
        assert all(line.startswith("dedupd: ") and line.count("dedupd: ") == 1
                   for line in lines)


NAMES = r"""
import os, sys, logging
from dedupd.events import Event, emit, setup_logging
setup_logging(sys.argv[1], "debug")
forged = "a.jpg\ndedupd: <crit> circuit_open: forged"
bad = os.fsdecode(b"/d/bad\xff\xfe.jpg")
for name in (forged, bad, "/d/caf\u00e9 \u2028.jpg"):
    emit(Event.IMAGE_REJECTED, f"{name}: corrupt", path=name, run=sys.argv[2])
    logging.getLogger("dedupd.names").warning("cannot move %s", name)
"""


def test_any_file_name_is_one_escaped_line_in_stderr_and_json() -> None:
    human = subprocess.run([sys.executable, "-c", NAMES, "stderr", "n"], capture_output=True,
                           timeout=30)
    assert human.returncode == 0, human.stderr
    lines = human.stderr.decode("utf-8").splitlines()  # valid UTF-8, whatever the names
    assert len(lines) == 6 and not any(x.startswith("dedupd: <crit>") for x in lines)
    assert lines[0] == ("dedupd: <warning> image_rejected: a.jpg\\ndedupd: <crit> "
                        "circuit_open: forged: corrupt")
    assert lines[2] == "dedupd: <warning> image_rejected: /d/bad\\xff\\xfe.jpg: corrupt"
    assert lines[3] == "dedupd: WARNING: cannot move /d/bad\\xff\\xfe.jpg"
    assert lines[4] == "dedupd: <warning> image_rejected: /d/caf\u00e9 \\u2028.jpg: corrupt"
    machine = subprocess.run([sys.executable, "-c", NAMES, "json", "n"], capture_output=True,
                             timeout=30)
    objs = [json.loads(line) for line in machine.stderr.decode("utf-8").splitlines()]
    assert len(objs) == 6
    assert objs[0]["path"] == "a.jpg\ndedupd: <crit> circuit_open: forged"  # exact, escaped
    assert objs[2]["path"] == "/d/bad\\xff\\xfe.jpg"  # bytes that are not UTF-8 as \xNN


def test_any_file_name_reaches_journald_as_its_exact_bytes(journald) -> None:
    tag = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-c", NAMES, "journald", tag], capture_output=True,
                          timeout=30)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    entries = wait_for(lambda: (e := journal_entries("DEDUPD_RUN", tag)) and len(e) == 3 and e,
                       20, "three entries")
    paths = []
    for e in entries:  # journalctl shows a field that is not UTF-8 as a list of bytes
        value = e["DEDUPD_PATH"]
        paths.append(bytes(value) if isinstance(value, list) else value.encode())
    assert sorted(paths) == sorted([b"a.jpg\ndedupd: <crit> circuit_open: forged",
                                    b"/d/bad\xff\xfe.jpg", "/d/caf\u00e9 \u2028.jpg".encode()])
    assert all("\n" not in e["MESSAGE"] for e in entries)


FAILURE = """
import sys, logging
from dedupd.events import setup_logging
setup_logging(sys.argv[1], "debug")
try:
    raise OSError("disk on fire")
except OSError:
    logging.getLogger("dedupd.daemon").exception("processing %s failed", "/d/x.jpg")
"""


@pytest.mark.parametrize("mode", ["json", "stderr"])
def test_a_record_with_a_traceback_is_logged_not_dropped(mode: str) -> None:
    """The daemon's "processing ... failed" records carry exc_info; they must be written,
    traceback included, not lost inside the handler."""
    proc = subprocess.run([sys.executable, "-c", FAILURE, mode], capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.decode().splitlines()
    if mode == "json":
        assert len(lines) == 1, lines
        obj = json.loads(lines[0])
        assert obj["message"] == "processing /d/x.jpg failed"
        assert "OSError: disk on fire" in obj["exception"]
    else:
        assert lines[0] == "dedupd: ERROR: processing /d/x.jpg failed", lines
        assert lines[-1] == "dedupd:   | OSError: disk on fire", lines


def test_python_warnings_are_log_records_not_raw_stderr() -> None:
    code = ("import warnings\nfrom dedupd.events import setup_logging\n"
            "setup_logging('json')\nwarnings.warn('callback already exists', RuntimeWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    record = json.loads(lines[0])
    assert record["logger"] == "py.warnings" and record["priority"] == 4
    assert "RuntimeWarning: callback already exists" in record["message"]
