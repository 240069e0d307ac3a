"""The CLI as a user runs it: real processes, exit codes, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2


def dedupd(*args: str, check: int | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "dedupd", *args], capture_output=True,
                          text=True, timeout=120)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def test_hash_prints_hex_and_path(make_photo) -> None:
    p = make_photo("a.jpg", seed=3)
    out = dedupd("hash", str(p), check=0).stdout.split()
    assert len(out[0]) == 16 and out[1] == str(p)
    js = json.loads(dedupd("hash", "--json", "--size", "16", str(p), check=0).stdout)
    assert len(js[0]["hash"]) == 64 and len(js[0]["digest"]) == 64


def test_hash_bad_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    proc = dedupd("hash", str(bad), check=2)
    assert "empty" in proc.stderr


def test_scan_then_check(make_photo, tmp_path: Path, config_file) -> None:
    data = tmp_path / "data"
    for s in range(6):
        make_photo(f"img{s}.jpg", seed=s, root=data)
    original = data / "img0.jpg"
    img = cv2.imread(str(original))
    cv2.imwrite(str(data / "zz_copy.png"), cv2.resize(img, (320, 240)))
    cfg = str(config_file())
    proc = dedupd("--config", cfg, "scan", "--json", str(data), check=1)
    summary = json.loads(proc.stdout)
    assert summary["duplicates"] == 1 and summary["indexed"] == 6
    assert summary["groups"][0]["original"] == str(original)
    probe = tmp_path / "probe.jpg"
    cv2.imwrite(str(probe), img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    js = json.loads(dedupd("--config", cfg, "check", "--json", str(probe), check=1).stdout)
    assert js["duplicate"] and js["matches"][0]["path"] == str(original)
    fresh = make_photo("fresh.jpg", seed=99)
    dedupd("--config", cfg, "check", str(fresh), check=0)
    stats = json.loads(dedupd("--config", cfg, "stats", "--json", check=0).stdout)
    assert stats["images"] == 6


def test_bad_config_one_line_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policies:\n  default:\n    max_distance: lots\n")
    proc = dedupd("--config", str(cfg), "validate", check=78)
    assert proc.stderr.strip().count("\n") == 0
    assert "policies.default.max_distance" in proc.stderr and str(cfg) in proc.stderr


def test_help_is_a_manual_and_usage_errors_exit_2(tmp_path: Path) -> None:
    top = dedupd("--help", check=0).stdout
    for word in ("exit status:", "files:", "environment:", "scan", "check", "quarantine"):
        assert word in top
    for command in ("hash", "scan", "check", "run", "quarantine", "db"):
        assert "usage: dedupd" in dedupd(command, "--help", check=0).stdout
    assert "invalid choice" in dedupd("frobnicate", check=2).stderr
    assert dedupd("hash", "--size", "7", str(tmp_path), check=2).stderr


def test_check_unreadable_file_is_an_error_with_json(tmp_path: Path, config_file) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    proc = dedupd("--config", str(config_file()), "check", "--json", str(text), check=2)
    assert json.loads(proc.stdout) == {"path": str(text), "error": "unsupported",
                                       "reason": "not a JPEG, PNG, WebP, BMP or TIFF image"}


def test_validate_json_and_missing_config(tmp_path: Path, config_file) -> None:
    (tmp_path / "data").mkdir()
    js = json.loads(dedupd("--config", str(config_file({"watches": [str(tmp_path / "data")]})),
                           "validate", "--json", check=0).stdout)
    assert js["valid"] is True and js["policies"] == ["default"]
    proc = dedupd("--config", str(tmp_path / "nope.yaml"), "validate", check=78)
    assert str(tmp_path / "nope.yaml") in proc.stderr and proc.stderr.count("\n") == 1


def test_scan_dry_run_changes_nothing(make_photo, tmp_path: Path, config_file) -> None:
    data = tmp_path / "data"
    make_photo("a.jpg", seed=1, root=data)
    (data / "b.jpg").write_bytes((data / "a.jpg").read_bytes())
    cfg = str(config_file())
    js = json.loads(dedupd("--config", cfg, "scan", "--dry-run", "--json", str(data),
                           check=1).stdout)
    assert js["duplicates"] == 1 and js["groups"][0]["duplicates"][0]["identical"]
    assert json.loads(dedupd("--config", cfg, "stats", "--json", check=0).stdout)["images"] == 0
    assert sorted(p.name for p in data.iterdir()) == ["a.jpg", "b.jpg"]


def test_scan_applies_each_roots_policy(make_photo, tmp_path: Path, config_file) -> None:
    data, logged = tmp_path / "data", tmp_path / "logged"
    original = make_photo("a.jpg", seed=1, root=data)
    make_photo("c.jpg", seed=2, root=data)
    img = cv2.imread(str(original))
    cv2.imwrite(str(data / "b.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 60])
    make_photo("x.jpg", seed=3, root=logged)
    (logged / "y.jpg").write_bytes((logged / "x.jpg").read_bytes())
    cfg = str(config_file({
        "watches": [{"path": str(data)}, {"path": str(logged), "policy": "audit"}],
        "policies": {"default": {"max_distance": 4}, "audit": {"action": "log"}}}))
    js = json.loads(dedupd("--config", cfg, "scan", "--json", str(data), str(logged),
                           check=1).stdout)
    assert (js["indexed"], js["duplicates"], js["quarantined"]) == (3, 2, 1)
    groups = {g["original"]: g["duplicates"] for g in js["groups"]}
    moved = groups[str(original)][0]
    assert moved["path"] == str(data / "b.jpg") and moved["action"] == "quarantine"
    assert Path(moved["moved_to"]).is_file() and not (data / "b.jpg").exists()
    assert groups[str(logged / "x.jpg")][0]["action"] == "log"
    assert (logged / "y.jpg").exists()
    listed = json.loads(dedupd("--config", cfg, "quarantine", "list", "--json",
                               check=0).stdout)
    assert [e["original_path"] for e in listed] == [str(data / "b.jpg")]
    again = json.loads(dedupd("--config", cfg, "scan", "--json", str(data), str(logged),
                              check=0).stdout)
    assert (again["known"], again["duplicates"]) == (4, 0)


def test_scan_shows_a_progress_bar_only_on_a_terminal(make_photo, tmp_path: Path,
                                                       config_file) -> None:
    import os
    import pty

    data = tmp_path / "data"
    for s in range(12):
        make_photo(f"{s}.jpg", seed=s, root=data, width=200, height=150)
    cfg = str(config_file())
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "dedupd", "--config", cfg, "scan", str(data)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
                          timeout=120)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal has no writer left
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"scan [" in screen and b"12/12" in screen
    piped = dedupd("--config", cfg, "scan", str(data), check=0)
    assert "scan [" not in piped.stderr and "12 files" in piped.stderr


def test_quarantine_list_pages_through_a_big_journal(tmp_path: Path, config_file) -> None:
    """`quarantine list` reads the journal a page at a time (#17): every quarantined entry
    once, oldest first, across page boundaries; names escaped in the text form."""
    from dedupd.cli.quarantine import PAGE
    from dedupd.store import QuarantineEntry, open_store

    cfg = str(config_file())
    store = open_store(str(tmp_path / "state" / "index.sqlite"))
    try:
        done = []
        for i in range(2 * PAGE + 100):
            name = "two\nlines.jpg" if i == 5 else f"{i}.jpg"
            entry = store.add_quarantine(QuarantineEntry(
                f"/data/{name}", f"/q/{name}", "/data/m.jpg", i % 5, "00", "default",
                state="restored" if i % 7 == 0 else "done"))
            if i % 7:
                done.append(entry.id)
    finally:
        store.close()
    listed = json.loads(dedupd("--config", cfg, "quarantine", "list", "--json", check=0).stdout)
    assert [e["id"] for e in listed] == done
    assert listed[4]["original_path"] == "/data/two\nlines.jpg"  # (JSON escapes it itself)
    text = dedupd("--config", cfg, "quarantine", "list", check=0)
    assert text.stderr == f"{len(done)} quarantined\n"
    lines = text.stdout.splitlines()
    assert len(lines) == 2 * len(done) and lines[8].endswith("/data/two\\nlines.jpg")


def test_demo_catches_the_planted_duplicates() -> None:
    """`dedupd demo`: a real daemon on a throwaway folder; the three planted copies are
    quarantined, the new scene and the originals kept, the folder removed."""
    proc = dedupd("demo", "--json", check=0)
    js = json.loads(proc.stdout)
    caught = sorted(Path(e["original_path"]).name for e in js["quarantined"])
    assert caught == ["photo_03_small.jpg", "photo_05_copy.jpg", "photo_07_q50.jpg"]
    assert js["kept"] == 13 and not Path(js["folder"]).exists()
    plain = dedupd("demo", check=0)
    assert "13 images kept, 3 duplicates quarantined:" in plain.stdout
    assert "dataset/test/photo_07_q50.jpg  (distance" in plain.stdout


def test_review_and_reload_errors_are_one_line_and_json(config_file) -> None:
    """Every command's errors go through one place: one line on stderr, or under --json a
    JSON object on stdout (review printed a bad --listen as text even under --json)."""
    cfg = str(config_file())
    for args, kind, said in ((["review", "--listen", "nowhere"], "usage", "--listen: "),
                             (["reload"], "reload", "reload: no daemon pid")):
        plain = dedupd("--config", cfg, *args, check=2)
        assert plain.stderr.startswith(f"dedupd: {said}") and plain.stdout == ""
        assert len(plain.stderr.splitlines()) == 1, plain.stderr
        as_json = dedupd("--config", cfg, "--json", *args, check=2)
        js = json.loads(as_json.stdout)
        assert (js["error"], js["exit_status"]) == (kind, 2) and said in js["message"]
        assert as_json.stderr == ""


def test_output_helpers_print_one_json_document_per_call(capsys) -> None:
    """cli.output, in process: a streamed list is the same JSON as a whole one, names
    that are not UTF-8 come out escaped, a CommandError is one line or one JSON object."""
    import os

    from dedupd.cli.output import (
        CommandError,
        UsageError,
        fail,
        fields_of,
        print_json,
        print_json_list,
    )
    from dedupd.store import QuarantineEntry

    name = os.fsdecode(b"/d/bad\xff.jpg")
    entries = [QuarantineEntry(name, "/q/1", "/d/m.jpg", 2, "00", "default", id=7),
               QuarantineEntry("/d/two\nlines.jpg", "/q/2", "/d/m.jpg", 0, "00", "p")]
    print_json_list(fields_of(e) for e in entries)
    print_json([fields_of(e) for e in entries])
    print_json_list([])
    streamed, whole, empty = capsys.readouterr().out.splitlines()
    assert streamed == whole and empty == "[]"
    listed = json.loads(streamed)
    assert listed[0]["original_path"] == "/d/bad\\xff.jpg" and listed[0]["id"] == 7
    assert listed[1]["original_path"] == "/d/two\nlines.jpg"
    assert set(listed[0]) == {f for f in vars(entries[0])}
    assert (UsageError("x").kind, UsageError("x").status) == ("usage", 2)
    assert fail(True, "reload", CommandError("reload", "no pid").args[0], 2) == 2
    assert fail(False, "store", "it broke\nbadly", 78) == 78
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "reload", "message": "no pid", "exit_status": 2}
    assert err == "dedupd: it broke\\nbadly\n"


def test_db_copy_refuses_the_same_store_under_another_name(tmp_path: Path,
                                                           config_file) -> None:
    """`db export sqlite:////path` of the configured sqlite:///path re-read every row of
    the store into itself and said '0 copied'."""
    cfg = str(config_file())
    index = tmp_path / "state" / "index.sqlite"
    dedupd("--config", cfg, "db", "migrate", check=0)
    (tmp_path / "link.sqlite").symlink_to(index)
    for url in (f"sqlite:///{index}", str(tmp_path / "link.sqlite")):
        err = dedupd("--config", cfg, "db", "export", url, check=2).stderr
        assert "source and destination are the same store" in err, err
