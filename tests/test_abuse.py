"""Issue #12 as a user and an attacker try it: bad configs, odd files, odd names, --json.
Real processes, real files, a real SQLite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, records, wait_for, write_config


def dedupd(*args: str, check: int | None = None, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "dedupd", *args], capture_output=True,
                          text=True, timeout=120, **kw)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return write_config(tmp_path / "dedupd.yaml", {
        "index": str(tmp_path / "state" / "index.sqlite"),
        "quarantine_dir": str(tmp_path / "state" / "q"), "settle_seconds": 0.2,
        "watches": [{"path": str(root)}]})


# ---------------------------------------------------------------- item 2: encodings


def test_reload_with_a_latin1_byte_keeps_the_old_config(cfg: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        good = cfg.read_bytes()
        cfg.write_bytes(good + b"# caf\xe9\n")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in daemon.log(), 30, "the reload to fail")
        assert "not valid UTF-8: byte 0xe9" in daemon.log()
        cfg.write_bytes(good.decode().encode("utf-16"))
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "is UTF-16" in daemon.log(), 30, "the second reload to fail")
        write_image(root / "after.jpg", photo(21, 320, 240))
        wait_for(lambda: str(root / "after.jpg") in records(tmp_path / "state" / "index.sqlite"),
                 30, "the old config to keep working")
        assert daemon.proc.poll() is None
        assert "Traceback" not in daemon.log()
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("command", ["validate", "run"])
def test_non_utf8_config_at_start_is_one_line_exit_78(tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"# r\xe9sum\xe9\nwatches: []\n")
    proc = dedupd("--config", str(bad), command, check=78)
    assert proc.stderr == f"dedupd: {bad}: not valid UTF-8: byte 0xe9 at line 1, column 4; " \
        "save it as UTF-8\n"


# ---------------------------------------------------------------- item 14: validate = run


@pytest.mark.parametrize("watches, why", [
    ([], "watches: nothing to watch"),
    (["absent"], "does not exist"),
    (["file"], "is not a directory"),
])
def test_validate_refuses_what_run_refuses(tmp_path: Path, watches: list[str], why: str) -> None:
    (tmp_path / "file").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", {"index": str(tmp_path / "i.sqlite"),
                                             "watches": [str(tmp_path / w) for w in watches]})
    assert why in dedupd("--config", str(cfg), "validate", check=78).stderr
    assert dedupd("--config", str(cfg), "--log", "stderr", "run").returncode != 0


# ---------------------------------------------------------------- item 3: process pools


def test_scan_and_hash_j2_survive_rejected_files(tmp_path: Path, cfg: Path) -> None:
    folder = tmp_path / "folder"
    for i in range(10):
        write_image(folder / f"img{i}.jpg", photo(100 + i, 160, 120))
    (folder / "broken.jpg").write_bytes(b"not an image at all" * 10)
    (folder / "empty.jpg").write_bytes(b"")
    files = sorted(str(p) for p in folder.iterdir())
    proc = dedupd("hash", "-j", "2", *files, check=2)
    assert "BrokenProcessPool" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 10
    assert "broken.jpg: unsupported" in proc.stderr and "empty.jpg: empty" in proc.stderr
    scan = dedupd("--config", str(cfg), "scan", "-j", "2", "--json", str(folder), check=2)
    js = json.loads(scan.stdout)
    assert (js["files"], js["indexed"], js["errors"]) == (12, 10, 2)
    # Duplicates and failures: failures win (2), duplicates alone are 1, clean is 0.
    write_image(folder / "copy.jpg", photo(100, 160, 120))
    assert dedupd("--config", str(cfg), "scan", "-j", "2", str(folder)).returncode == 2
    (folder / "broken.jpg").unlink()
    (folder / "empty.jpg").unlink()
    assert dedupd("--config", str(cfg), "scan", "-j", "2", str(folder)).returncode == 1


def test_image_error_crosses_a_process_boundary() -> None:
    import pickle

    from dedupd.hashing import ImageError

    back = pickle.loads(pickle.dumps(ImageError("corrupt", "JPEG data could not be decoded")))
    assert (back.kind, back.reason) == ("corrupt", "JPEG data could not be decoded")


# ---------------------------------------------------------------- item 16: right reasons


def test_hash_and_check_agree_and_name_special_files(tmp_path: Path, cfg: Path) -> None:
    missing = tmp_path / "missing.jpg"
    h = dedupd("hash", str(missing), check=2).stderr
    c = dedupd("--config", str(cfg), "check", str(missing), check=2).stderr
    assert h == c == f"dedupd: {missing}: unreadable: No such file or directory\n"
    sock_path = tmp_path / "sock.jpg"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert "sock.jpg: not_regular: a socket" in dedupd("hash", str(sock_path),
                                                            check=2).stderr
    os.mkfifo(tmp_path / "fifo.jpg")
    assert "fifo.jpg: not_regular: a FIFO" in dedupd("hash", str(tmp_path / "fifo.jpg"),
                                                     check=2).stderr


def test_daemon_names_each_kind_of_link_and_special_file(cfg: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    outside = write_image(tmp_path / "outside.jpg", photo(5, 160, 120))
    inside = write_image(root / "real.jpg", photo(6, 160, 120))
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        os.symlink(outside, root / "out.jpg")
        os.symlink(inside, root / "in.jpg")
        os.symlink(root / "nothing.jpg", root / "dangling.jpg")
        os.symlink(root / "loop2.jpg", root / "loop1.jpg")
        os.symlink(root / "loop1.jpg", root / "loop2.jpg")
        os.mkfifo(root / "fifo.jpg")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(root / "sock.jpg"))
            expected = {
                "out.jpg": "symlink pointing out of the watched roots",
                "in.jpg": "symlink to a file inside the watched roots, not followed",
                "dangling.jpg": "dangling symlink",
                "loop1.jpg": "symlink loop", "loop2.jpg": "symlink loop",
                "fifo.jpg": "a FIFO, not a regular file",
                "sock.jpg": "a socket, not a regular file"}
            for name, why in expected.items():
                wait_for(lambda n=name, w=why: f"{n}: not_regular: {w}" in daemon.log(), 30,
                         f"{name} logged as {why}")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


# ---------------------------------------------------------------- item 17: --json


def test_json_everywhere_errors_included(tmp_path: Path, cfg: Path) -> None:
    for args in (["--json", "validate"], ["validate", "--json"]):
        js = json.loads(dedupd("--config", str(cfg), *args, check=0).stdout)
        assert js["valid"] is True and js["watches"][0]["path"] == str(tmp_path / "data")
    for args in (["--json", "quarantine", "list"], ["quarantine", "--json", "list"],
                 ["quarantine", "list", "--json"]):
        assert json.loads(dedupd("--config", str(cfg), *args, check=0).stdout) == []
    js = json.loads(dedupd("--config", str(cfg), "db", "--json", "migrate", check=0).stdout)
    assert js["action"] == "migrate"
    err = dedupd("--json", "frobnicate", check=2)
    assert json.loads(err.stdout)["error"] == "usage" and err.stderr == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: lots\n")
    err = dedupd("--config", str(bad), "--json", "validate", check=78)
    assert json.loads(err.stdout) == {"error": "config", "exit_status": 78,
                                      "message": f"{bad}: workers: expected an integer, got str"}
    err = dedupd("--config", str(cfg), "--json", "--log", "stderr", "run", check=2)
    assert "contradicts --log stderr" in json.loads(err.stdout)["message"]
    assert json.loads(dedupd("--config", str(cfg), "quarantine", "purge", "--older-than",
                             "-1", "--json", check=2).stdout)["error"] == "usage"


def test_run_json_means_json_log_lines(cfg: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dedupd", "--config", str(cfg), "run",
                                 "--json"], stdout=fh, stderr=fh)
    try:
        write_image(tmp_path / "data" / "a.jpg", photo(7, 160, 120))
        wait_for(lambda: "image_accepted" in log.read_text(), 30, "a decision")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line) for line in lines)


# ---------------------------------------------------------------- item 20: stats, purge


def test_stats_is_a_table_and_creates_nothing(tmp_path: Path, cfg: Path) -> None:
    index = tmp_path / "state" / "index.sqlite"
    err = dedupd("--config", str(cfg), "stats", check=2).stderr
    assert "no such index" in err and err.count("\n") == 1
    assert not index.exists()
    dedupd("--config", str(cfg), "scan", str(tmp_path / "data"), check=0)
    out = dedupd("--config", str(cfg), "stats", check=0).stdout
    assert "{" not in out and out.startswith("backend         sqlite\n")
    assert json.loads(dedupd("--config", str(cfg), "--json", "stats", check=0).stdout)[
        "images"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_stats_as_nobody_without_config_is_one_line(tmp_path: Path) -> None:
    """In a forked child that became nobody (this Python's files may be closed to nobody,
    so everything stats needs is imported first): one line, exit 2, nothing created."""
    import dedupd.store.sqlite  # noqa: F401 - imported before the fork, see above
    from dedupd.cli import main

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody, no config, a home it cannot write
        try:
            os.dup2(write, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.environ.update(HOME="/nonexistent")
            for var in ("XDG_STATE_HOME", "DEDUPD_CONFIG", "STATE_DIRECTORY"):
                os.environ.pop(var, None)
            sys.stderr = os.fdopen(2, "w")
            code = main(["stats"])
            sys.stderr.flush()
        except BaseException:
            code = 99
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 2, err
    assert err.count("\n") == 1 and "no such index" in err and "Traceback" not in err
    assert not Path("/nonexistent").exists()


def test_read_only_commands_on_a_fresh_install_create_nothing(tmp_path: Path,
                                                               cfg: Path) -> None:
    """`quarantine list` and `check` created an empty store (root-owned, under sudo) before
    anything was indexed: they report nothing, exit 0, and leave the state alone."""
    state = tmp_path / "state"
    image = write_image(tmp_path / "data" / "a.jpg", photo(4, 160, 120))
    for args in (["quarantine", "list", "--json"], ["quarantine", "list", "--pending",
                                                     "--json"]):
        assert json.loads(dedupd("--config", str(cfg), *args, check=0).stdout) == []
    assert dedupd("--config", str(cfg), "quarantine", "list", check=0).stderr == \
        "0 quarantined\n"
    purge = dedupd("--config", str(cfg), "quarantine", "purge", "--older-than", "0",
                   "--json", check=0)
    assert json.loads(purge.stdout) == {"purged": [], "dry_run": False}
    js = json.loads(dedupd("--config", str(cfg), "check", "--json", str(image),
                           check=0).stdout)
    assert (js["path"], js["duplicate"], js["matches"]) == (str(image), False, [])
    assert dedupd("--config", str(cfg), "check", str(image), check=0).stdout == \
        f"unique  {image}\n"
    assert not state.exists()
    dedupd("--config", str(cfg), "scan", str(tmp_path / "data"), check=0)
    copy = tmp_path / "copy.jpg"  # (check never matches a file with itself)
    copy.write_bytes(image.read_bytes())
    assert json.loads(dedupd("--config", str(cfg), "check", "--json", str(copy),
                             check=1).stdout)["duplicate"] is True


def test_purge_refuses_negative_days(cfg: Path) -> None:
    for days in ("-1", "nan", "inf", "soon"):
        err = dedupd("--config", str(cfg), "quarantine", "purge", "--older-than", days,
                     check=2).stderr
        assert "not a number of days" in err and err.count("\n") == 1


# ---------------------------------------------------------------- item 6: names in output


def test_names_that_are_not_utf8_or_hold_a_newline(tmp_path: Path, cfg: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    data = (write_image(tmp_path / "src.jpg", photo(8, 160, 120))).read_bytes()
    raw = os.fsencode(folder) + b"/bad\xff.jpg"
    with open(raw, "wb") as fh:
        fh.write(data)
    (folder / "two\nlines.jpg").write_bytes(data)
    out = dedupd("hash", str(folder / "two\nlines.jpg"), os.fsdecode(raw), check=0).stdout
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("two\\nlines.jpg")
    assert lines[1].endswith("/bad\\xff.jpg")
    js = json.loads(dedupd("hash", "--json", os.fsdecode(raw), check=0).stdout)
    assert js[0]["path"].endswith("/bad\\xff.jpg")
    os.unlink(raw)  # (names that are not UTF-8 in the store: the store's own tests)
    (folder / "copy.jpg").write_bytes(data)
    scan = dedupd("--config", str(cfg), "scan", str(folder), check=1)
    assert "Traceback" not in scan.stderr
    assert "two\\nlines.jpg" in scan.stdout and len(scan.stdout.splitlines()) == 2


# ---------------------------------------------------------------- item 15: decoder warnings


def jpeg_with_extraneous_bytes(path: Path, seed: int) -> Path:
    """A JPEG libjpeg decodes fully but complains about: junk before its EOI marker."""
    import cv2

    good = cv2.imencode(".jpg", photo(seed, 160, 120))[1].tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good[:-2] + b"\0" * 100 + good[-2:])
    return path


WARNING = "Corrupt JPEG data: 94 extraneous bytes before marker 0xd9"  # for seed 1
SAID = "Corrupt JPEG data: "  # (the count varies with the picture)


def test_decoder_warnings_go_with_their_file(tmp_path: Path, cfg: Path) -> None:
    warn = jpeg_with_extraneous_bytes(tmp_path / "in" / "warn.jpg", 1)
    clean = write_image(tmp_path / "in" / "clean.jpg", photo(2, 160, 120))
    proc = dedupd("hash", str(warn), str(clean), check=0)
    assert proc.stderr == f"dedupd: {warn}: warning: decoded with complaints (hashed " \
        f"anyway): {WARNING}\n"
    js = json.loads(dedupd("hash", "--json", str(warn), str(clean), check=0).stdout)
    assert [o["warnings"] for o in js] == [[WARNING], []]
    for i in range(8):
        write_image(tmp_path / "in" / f"more{i}.jpg", photo(10 + i, 160, 120))
    scan = json.loads(dedupd("--config", str(cfg), "scan", "-j", "2", "--json",
                             str(tmp_path / "in"), check=0).stdout)
    assert scan["warnings_detail"] == [{"path": str(warn), "warnings": [WARNING]}]


THREADS = """
import sys, threading
from dedupd.decoder_messages import DECODER_MESSAGES
from dedupd.hashing import hash_file
DECODER_MESSAGES.enabled = True
files = sys.argv[1:]
wrong = []
def work():
    for _ in range(15):
        for f in files:
            said = hash_file(f).warnings
            if bool(said) != ("/warn" in f):
                wrong.append((f, said))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(len(wrong))
"""


def test_decoder_warnings_are_told_apart_between_threads(tmp_path: Path) -> None:
    files = [str(jpeg_with_extraneous_bytes(tmp_path / f"warn{i}.jpg", i)) for i in range(3)]
    files += [str(write_image(tmp_path / f"clean{i}.jpg", photo(20 + i, 160, 120)))
              for i in range(5)]
    proc = subprocess.run([sys.executable, "-c", THREADS, *files], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0\n" and proc.stderr == ""  # nothing raw on stderr either


def test_daemon_json_log_stays_json_with_decoder_warnings(cfg: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dedupd", "--config", str(cfg), "--log",
                                 "json", "run"], stdout=fh, stderr=fh)
    try:
        warn = jpeg_with_extraneous_bytes(tmp_path / "data" / "warn.jpg", 3)
        wait_for(lambda: str(warn) in records(tmp_path / "state" / "index.sqlite"), 30,
                 "the image accepted")
        wait_for(lambda: SAID in log.read_text(), 30, "the warning logged")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    objs = [json.loads(line) for line in log.read_text().splitlines()]  # every line JSON
    said = [o for o in objs if SAID in o.get("message", "")]
    assert len(said) == 1 and str(warn) in said[0]["message"] and said[0]["priority"] == 4


# ---------------------------------------------------------------- item 20: circuit breaker


def test_circuit_breaker_message_says_what_it_counted(tmp_path: Path) -> None:
    import cv2

    root = tmp_path / "root"
    img = photo(31, 320, 240)
    write_image(root / "a0.jpg", img, quality=95)
    for i, q in enumerate((90, 85, 80, 75, 70, 65), 1):  # near copies: all duplicates
        (root / f"a{i}.jpg").write_bytes(
            cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes())
    cfg = write_config(tmp_path / "c.yaml", {
        "index": str(tmp_path / "i.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "watches": [str(root)], "policies": {"default": {"max_distance": 8}},
        "circuit_breaker": {"window": 50, "min_decisions": 4, "threshold": 0.5}})
    proc = dedupd("--config", str(cfg), "--log", "stderr", "scan", "-j", "1", str(root))
    assert proc.returncode == 1, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "circuit_open" in line]
    assert said == [f"dedupd: <crit> circuit_open: {root}: 75% of the last 4 decisions would "
                    "remove files; this root is now log-only until the end of this scan. "
                    "Check max_distance!"]


def test_os_and_quarantine_errors_are_one_line_and_json(tmp_path: Path, cfg: Path) -> None:
    """Found by the newcomer trial: tracebacks for a gallery directory that is a file, and
    `restore --json` errors printed as plain text."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for args in (["review", "--html", str(a_file)], ["restore", "99"]):
        plain = dedupd("--config", str(cfg), *args, check=2)
        assert "Traceback" not in plain.stderr, plain.stderr
        assert len(plain.stderr.splitlines()) == 1 and plain.stderr.startswith("dedupd: ")
        as_json = dedupd("--config", str(cfg), "--json", *args, check=2)
        err = json.loads(as_json.stdout)
        assert err["exit_status"] == 2 and err["message"], err
        assert "Traceback" not in as_json.stderr, as_json.stderr


def test_restore_of_an_id_beyond_64_bits_is_one_line(tmp_path: Path, cfg: Path) -> None:
    """`restore 99999999999999999999999` was an OverflowError traceback from SQLite."""
    dedupd("--config", str(cfg), "db", "migrate", check=0)  # a store, empty
    for target in ("99999999999999999999999", str(2**63), "0"):
        err = dedupd("--config", str(cfg), "restore", target, check=2).stderr
        assert err == f"dedupd: no quarantine entry {target}\n", err


def test_scan_of_a_named_fifo_says_not_regular(tmp_path: Path, cfg: Path) -> None:
    """`scan d/f.jpg` on a FIFO said "0 files", exit 0 (the directory's scan named it)."""
    fifo = tmp_path / "f.jpg"
    os.mkfifo(fifo)
    out = dedupd("--config", str(cfg), "scan", "--dry-run", str(fifo), check=2)
    assert "not_regular" in out.stdout + out.stderr, (out.stdout, out.stderr)

