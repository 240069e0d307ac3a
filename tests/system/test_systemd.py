"""dedupd under a real systemd (PID 1 in a booted Debian container), installed as the
README says, checked as its users see it. The tests run in file order and build on each
other: install, start, ingest, restore, reload, watchdog, SIGKILL, config error."""

from __future__ import annotations

import json
import re
import shlex
import time

from conftest import CONFIG, DATA, wait_until
from machine import Machine

TRAIN = f"{DATA}/datasets/cats/train"
INCOMING = f"{DATA}/incoming"
QUARANTINE = f"{DATA}/quarantine"
REJECTED = f"{DATA}/rejected"
DEDUPD = "/opt/dedupd/venv/bin/dedupd"
# Writes test images as their producer would (run with the installed venv's Python).
MKIMG = """\
import sys, cv2, numpy as np
kind, out = sys.argv[1], sys.argv[2]
if kind == "noise":  # a distinct picture per seed: smooth blobs, not white noise
    rng = np.random.default_rng(int(sys.argv[3]))
    im = cv2.resize((rng.random((6, 8, 3)) * 255).astype(np.uint8), (160, 120),
                    interpolation=cv2.INTER_CUBIC)
elif kind == "near":  # the same picture, resized and re-encoded: another file, same hash
    im = cv2.imread(sys.argv[3])
    im = cv2.resize(im, (im.shape[1] * 9 // 10, im.shape[0] * 9 // 10))
cv2.imwrite(out, im, [cv2.IMWRITE_JPEG_QUALITY, 80])
"""


def alice(m: Machine, script: str, **kw: object):  # type: ignore[no-untyped-def]
    """A dataset producer: a normal user owning the files she writes."""
    return m.run("bash", "-euo", "pipefail", "-c", script, user="alice", **kw)  # type: ignore[arg-type]


def show(m: Machine, *props: str) -> dict[str, str]:
    out = m.run("systemctl", "show", "dedupd", *(f"-p{p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(m: Machine, *args: str) -> list[dict[str, str]]:
    out = m.run("journalctl", "-o", "json", "--no-pager", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(m: Machine, event: str, *args: str) -> list[dict[str, str]]:
    return journal(m, "-u", "dedupd", f"DEDUPD_EVENT={event}", *args)


def inode_owner(m: Machine, path: str) -> tuple[str, str, str, str]:
    return tuple(m.run("stat", "-c", "%i %U %a %Y", path).stdout.split())  # type: ignore[return-value]


def quarantined(path: str) -> str:
    return f"{QUARANTINE}{path}"


def write_config(m: Machine, text: str) -> None:
    m.run("tee", "/etc/dedupd/dedupd.yaml", input=text)


# ---------------------------------------------------------------- install, as the README says


def test_install_as_the_readme_says(machine: Machine) -> None:
    m = machine
    m.run("useradd", "--create-home", "alice")
    m.run("mkdir", "-p", "/home/alice/bin")
    m.run("tee", "/home/alice/bin/mkimg.py", input=MKIMG)
    # README: "sudo deploy/install.sh" from the source; with the example config, whose
    # roots do not exist yet, it installs everything and says what to create.
    first = m.sh("cd /root/dedupd && deploy/install.sh", check=False)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "systemd-sysusers" in first.stdout and "does not exist" in first.stderr
    assert m.run("getent", "passwd", "dedupd").stdout.split(":")[6].strip() == \
        "/usr/sbin/nologin"
    # The service's user can read its config (issue #11 item 1).
    assert m.run("stat", "-c", "%U:%G %a", "/etc/dedupd/dedupd.yaml").stdout.split() == \
        ["root:dedupd", "640"]
    m.run("head", "-1", "/etc/dedupd/dedupd.yaml", user="dedupd")
    # The operator's roots (owned by the dataset's producer), then the config.
    m.sh(f"mkdir -p {TRAIN} {INCOMING} && chown alice: {TRAIN} {INCOMING}")
    write_config(m, CONFIG)
    second = m.sh("cd /root/dedupd && deploy/install.sh", check=False)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"{TRAIN}: cannot write it" in second.stderr, second.stderr
    # Run exactly what it says, then install again: ready.
    fixes = second.stderr.split("run, as root:\n", 1)[1]
    for line in fixes.splitlines():
        if line.startswith("  "):
            m.sh(line.strip())
    third = m.sh("cd /root/dedupd && deploy/install.sh")
    assert "start with: systemctl enable --now dedupd" in third.stdout
    assert f"ReadWritePaths={DATA}" in m.run(
        "cat", "/etc/systemd/system/dedupd.service.d/paths.conf").stdout
    verify = m.run("systemd-analyze", "verify", "dedupd.service", check=False)
    assert verify.returncode == 0 and "dedupd" not in verify.stderr, verify.stderr
    m.run("systemctl", "enable", "--now", "dedupd")


def test_active_through_ready_with_status(machine: Machine) -> None:
    m = machine
    state = show(m, "ActiveState", "SubState", "StatusText", "Type", "User")
    assert (state["ActiveState"], state["SubState"], state["Type"], state["User"]) == \
        ("active", "running", "notify", "dedupd")
    wait_until(lambda: show(m, "StatusText")["StatusText"].startswith("2 roots;"), 30,
               "STATUS= with the roots")
    assert re.match(r"2 roots; \d+ indexed, \d+ processed, .* queue \d+",
                    show(m, "StatusText")["StatusText"])
    sec = m.run("systemd-analyze", "security", "dedupd.service", "--no-pager").stdout
    exposure = re.search(r"Overall exposure level for dedupd.service: (\d+\.\d+)", sec)
    assert exposure and float(exposure.group(1)) <= 1.0, sec[-300:]
    print(f"systemd-analyze security: {exposure.group(0)}")


# ---------------------------------------------------------------- decisions


def test_duplicates_are_quarantined_by_atomic_rename(machine: Machine) -> None:
    m = machine
    alice(m, f"/opt/dedupd/venv/bin/python ~/bin/mkimg.py noise {TRAIN}/cat.jpg 1")
    wait_until(lambda: events(m, "image_accepted", f"DEDUPD_PATH={TRAIN}/cat.jpg"), 30,
               "the original accepted")
    # An exact copy and a near-duplicate (resized, re-encoded), written under a temporary
    # name and renamed in, as the drop-folder convention says.
    alice(m, f"cp {TRAIN}/cat.jpg ~/copy.jpg && "
          f"/opt/dedupd/venv/bin/python ~/bin/mkimg.py near ~/near.jpg {TRAIN}/cat.jpg && "
          f"mv ~/copy.jpg {TRAIN}/.copy.tmp && mv ~/near.jpg {TRAIN}/.near.tmp")
    before = {name: inode_owner(m, f"{TRAIN}/.{name}.tmp") for name in ("copy", "near")}
    alice(m, f"mv {TRAIN}/.copy.tmp {TRAIN}/copy.jpg && mv {TRAIN}/.near.tmp {TRAIN}/near.jpg")
    for name in ("copy", "near"):
        target = quarantined(f"{TRAIN}/{name}.jpg")
        wait_until(lambda t=target: m.run("test", "-e", t + ".json", check=False)
                   .returncode == 0, 30, f"{name}.jpg quarantined")
        after = inode_owner(m, target)
        assert after == before[name], f"{name}: {before[name]} -> {after} (not a rename)"
        assert after[1] == "alice"
        assert m.run("test", "-e", f"{TRAIN}/{name}.jpg", check=False).returncode == 1
    assert m.run("test", "-e", f"{TRAIN}/cat.jpg", check=False).returncode == 0


def test_bad_files_are_rejected(machine: Machine) -> None:
    m = machine
    alice(m, f"printf 'not an image' > ~/notes && mv ~/notes {INCOMING}/notes.jpg && "
          f": > ~/empty && mv ~/empty {INCOMING}/empty.png")
    for name, kind in (("notes.jpg", "unsupported"), ("empty.png", "empty")):
        found = wait_until(lambda n=name: events(m, "image_rejected",
                                                 f"DEDUPD_PATH={INCOMING}/{n}"), 30,
                           f"{name} rejected")
        assert found[0]["DEDUPD_KIND"] == kind
        assert found[0]["DEDUPD_QUARANTINE_PATH"] == f"{REJECTED}{INCOMING}/{name}"
        m.run("test", "-e", f"{REJECTED}{INCOMING}/{name}")


def test_journal_fields_and_catalog(machine: Machine) -> None:
    m = machine
    entry = events(m, "duplicate_quarantined", f"DEDUPD_PATH={TRAIN}/copy.jpg")[0]
    for field in ("DEDUPD_EVENT", "DEDUPD_PATH", "DEDUPD_MATCH", "DEDUPD_DISTANCE",
                  "DEDUPD_ACTION", "DEDUPD_QUARANTINE_PATH", "DEDUPD_HASH", "DEDUPD_POLICY",
                  "DEDUPD_ROOT"):
        assert entry.get(field), field
    assert entry["MESSAGE_ID"] == "8b987181175c4384926e9fadbd632c27"
    assert entry["_SYSTEMD_UNIT"] == "dedupd.service"
    rejected = events(m, "image_rejected")[0]
    assert rejected["DEDUPD_REASON"] and rejected["DEDUPD_KIND"]
    explained = m.run("journalctl", "-u", "dedupd", "-x", "--no-pager").stdout
    assert "Subject: dedupd quarantined a duplicate image" in explained
    assert "Subject: dedupd could not use an image" in explained
    assert "(DEDUPD_" not in explained and "@DEDUPD_" not in explained, \
        [line for line in explained.splitlines() if "DEDUPD_" in line][:3]


# ---------------------------------------------------------------- commands run by an operator


def test_restore_from_a_root_shell(machine: Machine) -> None:
    m = machine
    target = quarantined(f"{TRAIN}/near.jpg")
    before = inode_owner(m, target)
    out = m.run(DEDUPD, "restore", target)  # as root, as an operator would
    assert f"restored {TRAIN}/near.jpg" in out.stdout
    assert inode_owner(m, f"{TRAIN}/near.jpg") == before
    # Seen with the service's entries: journalctl -t dedupd (the README says so).
    wait_until(lambda: [e for e in journal(m, "-t", "dedupd", "DEDUPD_EVENT=restored")
                        if e.get("DEDUPD_PATH") == f"{TRAIN}/near.jpg"], 10,
               "the restore in the journal")
    assert m.run("test", "-e", f"{TRAIN}/near.jpg", check=False).returncode == 0


def test_scan_as_root_leaves_nothing_root_owned(machine: Machine) -> None:
    m = machine
    # New subdirectories need new quarantine subdirectories: the scan (run as root)
    # creates them; the service must still be able to use them afterwards.
    m.run("systemctl", "stop", "dedupd")
    alice(m, f"mkdir -p {INCOMING}/batch1 {INCOMING}/batch2 && "
          f"/opt/dedupd/venv/bin/python ~/bin/mkimg.py noise {INCOMING}/batch1/a.jpg 7 && "
          f"cp {INCOMING}/batch1/a.jpg {INCOMING}/batch1/b.jpg")
    scan = m.run(DEDUPD, "scan", INCOMING, check=False)
    assert scan.returncode == 1, scan.stdout + scan.stderr  # duplicates found
    owned_by_root = m.run("find", QUARANTINE, REJECTED, "/var/lib/dedupd", "-user", "root")
    assert owned_by_root.stdout == "", owned_by_root.stdout
    m.run("systemctl", "start", "dedupd")
    alice(m, f"cp {INCOMING}/batch1/a.jpg {INCOMING}/batch1/c.jpg")
    wait_until(lambda: events(m, "duplicate_quarantined",
                              f"DEDUPD_PATH={INCOMING}/batch1/c.jpg"), 30,
               "the service quarantining into the directory the root scan created")


# ---------------------------------------------------------------- reload


def test_reload_good_broken_and_with_new_roots(machine: Machine) -> None:
    m = machine
    pid = show(m, "MainPID")["MainPID"]
    write_config(m, CONFIG.replace("max_distance: 6", "max_distance: 5"))
    m.run("systemctl", "reload", "dedupd")
    assert events(m, "config_reloaded", f"_PID={pid}")  # done when reload returned
    assert show(m, "ActiveState")["ActiveState"] == "active"

    write_config(m, CONFIG + "  - path: [broken\n")
    broken = m.run("systemctl", "reload", "dedupd", check=False)
    assert broken.returncode != 0
    assert show(m, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    reload_log = m.run("journalctl", "-u", "dedupd", "-n", "20", "--no-pager").stdout
    assert "invalid YAML" in reload_log, reload_log

    # A root inside the tree the unit grants works at once.
    added = f"{DATA}/datasets/cats/test"
    m.sh(f"mkdir -p {added} && chown alice: {added}")
    m.sh(f"setfacl -R -m u:dedupd:rwX -m d:u:dedupd:rwX {added}")
    write_config(m, CONFIG + f"  - path: {added}\n    group: cats\n")
    m.run("systemctl", "reload", "dedupd")
    alice(m, f"cp {TRAIN}/cat.jpg {added}/leak.jpg")
    wait_until(lambda: events(m, "duplicate_quarantined", f"DEDUPD_PATH={added}/leak.jpg"),
               30, "the new root's duplicate quarantined")

    # A root outside it is read-only to the service until a restart: the reload says so.
    outside = "/opt/elsewhere"  # not /var/tmp: PrivateTmp= hides it
    m.run("mkdir", "-p", outside)
    m.sh(f"setfacl -m u:dedupd:rwX {outside}")
    write_config(m, CONFIG + f"  - path: {outside}\n")
    refused = m.run("systemctl", "reload", "dedupd", check=False)
    assert refused.returncode != 0
    failed = wait_until(lambda: events(m, "reload_failed", f"_PID={pid}"), 10, "reload_failed")
    assert "read-only to the service" in failed[-1]["MESSAGE"]
    assert "restart" in failed[-1]["MESSAGE"]
    assert show(m, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    write_config(m, CONFIG)
    m.run("systemctl", "reload", "dedupd")


# ---------------------------------------------------------------- watchdog


def faster_watchdog(m: Machine, seconds: int) -> None:
    """The shipped 30 s, shortened so the tier stays quick; the mechanism is the same."""
    m.run("tee", "/etc/systemd/system/dedupd.service.d/zz-test-watchdog.conf",
          input=f"[Service]\nWatchdogSec={seconds}\nRestartSec=1\n")
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "restart", "dedupd")


def watchdog_restart(m: Machine, old_pid: str, timeout: float) -> None:
    wait_until(lambda: show(m, "MainPID")["MainPID"] not in (old_pid, "0") and
               show(m, "ActiveState")["ActiveState"] == "active", timeout,
               "a new main process after the watchdog fired")
    said = m.run("journalctl", "-u", "dedupd", "--no-pager", "-n", "200").stdout
    assert "Watchdog timeout" in said, said[-2000:]


def test_watchdog_restarts_a_stopped_process(machine: Machine) -> None:
    m = machine
    faster_watchdog(m, 4)
    pid = show(m, "MainPID")["MainPID"]
    m.run("systemctl", "kill", "-s", "STOP", "--kill-whom=main", "dedupd")
    watchdog_restart(m, pid, 60)


def test_a_stuck_worker_stops_the_watchdog_pings(machine: Machine) -> None:
    m = machine
    pid = show(m, "MainPID")["MainPID"]
    # Hold the SQLite write lock (as the service's user): the next insert waits on it
    # (busy timeout 30 s), so a worker is stuck on one file past stall_seconds (5).
    holder = ("import sqlite3, time\n"
              "c = sqlite3.connect('/var/lib/dedupd/index.sqlite', isolation_level=None)\n"
              "c.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\ntime.sleep(120)\n")
    m.run("systemd-run", "--unit=lock-holder", "--uid=dedupd", "/usr/bin/python3", "-c",
          holder)
    try:
        alice(m, f"/opt/dedupd/venv/bin/python ~/bin/mkimg.py noise {INCOMING}/stuck.jpg 11")
        wait_until(lambda: "withholding watchdog ping" in m.run(
            "journalctl", "-u", "dedupd", f"_PID={pid}", "--no-pager").stdout, 30,
            "the pinger noticing the stuck worker")
        watchdog_restart(m, pid, 60)
    finally:
        m.run("systemctl", "stop", "lock-holder", check=False)
    wait_until(lambda: events(m, "image_accepted", f"DEDUPD_PATH={INCOMING}/stuck.jpg"), 60,
               "the file decided after the restart")


# ---------------------------------------------------------------- SIGKILL mid-ingest


def test_sigkill_mid_ingest_of_1000_files_loses_none(machine: Machine) -> None:
    m = machine
    drop = f"{DATA}/incoming/bulk"
    # 1,000 files: 900 distinct pictures and 100 exact copies (one in ten, interleaved:
    # a burst of copies alone would rightly trip the circuit breaker), made outside the
    # root and renamed in (the drop-folder convention) while the service works.
    alice(m, "mkdir -p ~/bulk && cd ~/bulk && /opt/dedupd/venv/bin/python - <<'EOF'\n"
          "import cv2, numpy as np, shutil\n"
          "for i in range(900):\n"
          "    rng = np.random.default_rng(1000 + i)\n"
          "    im = cv2.resize((rng.random((6, 8, 3)) * 255).astype(np.uint8), (96, 72),\n"
          "                    interpolation=cv2.INTER_CUBIC)\n"
          "    cv2.imwrite(f'{i:04d}.jpg', im)\n"
          "for i in range(0, 900, 9):\n"
          "    shutil.copyfile(f'{i:04d}.jpg', f'{i:04d}c.jpg')\n"
          "EOF")
    alice(m, f"mkdir -p {drop} && mv ~/bulk/* {drop}/", timeout=120)
    pid = show(m, "MainPID")["MainPID"]
    processed = lambda: int(re.search(  # noqa: E731
        r"(\d+) processed", show(m, "StatusText")["StatusText"] or "0 processed").group(1))
    start = processed()
    wait_until(lambda: processed() - start >= 100, 120, "ingest under way")
    m.run("systemctl", "kill", "-s", "KILL", "dedupd")
    wait_until(lambda: show(m, "MainPID")["MainPID"] not in (pid, "0"), 60,
               "restarted after SIGKILL")

    def accounted() -> tuple[int, int]:
        kept = m.sh(f"find {drop} -name '*.jpg' | wc -l").stdout.strip()
        moved = m.sh(f"find {quarantined(drop)} -name '*.jpg' 2>/dev/null | wc -l",
                     check=False).stdout.strip()
        return int(kept), int(moved or 0)

    wait_until(lambda: accounted() == (900, 100), 300, "every file decided: 900 kept, "
               "100 quarantined")
    names = m.sh(f"cd {drop} && ls; cd {quarantined(drop)} && ls | grep -v json$").stdout
    assert sorted(names.split()) == sorted([f"{i:04d}.jpg" for i in range(900)] +
                                           [f"{i:04d}c.jpg" for i in range(0, 900, 9)])
    partials = m.sh(f"find {DATA} /var/lib/dedupd -name '.dedupd-partial-*'").stdout
    assert partials == ""
    assert m.sh(f"find {drop} {quarantined(drop)} -name '*.jpg' ! -user alice").stdout == ""


# ---------------------------------------------------------------- a config error ends `failed`


def test_config_error_ends_failed_not_restarting(machine: Machine) -> None:
    m = machine
    write_config(m, CONFIG + "bogus_key: 1\n")
    start = m.run("systemctl", "restart", "dedupd", check=False)
    assert start.returncode != 0
    wait_until(lambda: show(m, "ActiveState")["ActiveState"] == "failed", 30, "failed")
    state = show(m, "Result", "ExecMainStatus", "NRestarts")
    assert state["ExecMainStatus"] == "78" and state["Result"] == "exit-code", state
    # (a manual restart zeroes NRestarts; RestartSec=1: a restart would have begun)
    time.sleep(3)
    assert show(m, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
    said = m.run("journalctl", "-u", "dedupd", "-n", "30", "--no-pager").stdout
    assert "bogus_key: unknown key" in said, said
    # Fixed: it starts again.
    write_config(m, CONFIG)
    m.run("systemctl", "restart", "dedupd")
    assert show(m, "ActiveState")["ActiveState"] == "active"


def test_unwritable_root_at_start_is_one_clear_line(machine: Machine) -> None:
    m = machine
    m.run("setfacl", "-x", "u:dedupd", INCOMING)
    try:
        assert m.run("systemctl", "restart", "dedupd", check=False).returncode != 0
        wait_until(lambda: show(m, "ActiveState")["ActiveState"] == "failed", 30, "failed")
        said = m.run("journalctl", "-u", "dedupd", "-n", "30", "--no-pager").stdout
        assert f"{INCOMING} is not writable by user dedupd" in said, said
        assert f"setfacl -m u:dedupd:rwX -m d:u:dedupd:rwX {shlex.quote(INCOMING)}" in said
    finally:
        m.run("setfacl", "-m", "u:dedupd:rwX", INCOMING)
    # The tier has started the unit many times by now: clear systemd's start-rate limit
    # ("Start request repeated too quickly"), as an operator would after fixing the cause.
    m.run("systemctl", "reset-failed", "dedupd")
    restart = m.run("systemctl", "restart", "dedupd", check=False)
    assert restart.returncode == 0, m.run("journalctl", "-u", "dedupd", "-n", "20",
                                          "--no-pager").stdout
