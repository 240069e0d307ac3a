"""dedupd.pipeline on its own: the one path of a file (admit → hash → look up → decide →
act → report) with real image files and a real SQLite store, no daemon and no watcher.
The daemon's part (is a file still being written, arrival order) is played by a small
Intake that records what it was told."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import photo, write_image
from daemonproc import write_config

from dedupd.config import load_config
from dedupd.events import Event, add_listener, remove_listener
from dedupd.hashing import hash_file
from dedupd.pipeline import Pipeline, record_for
from dedupd.store import QuarantineEntry, open_store
from dedupd.store.base import QUARANTINED


class Intake:
    """The daemon's side of the path: files judged at once, none still being written."""

    def __init__(self, *, finished: bool = True) -> None:
        self.finished = finished
        self.unreadable_dirs: list[Path] = []
        self.hash_times: list[float] = []
        self.looked_again: list[Path] = []

    def unreadable(self, directory: Path, exc: OSError) -> None:
        self.unreadable_dirs.append(directory)

    def changed(self, path: Path, before: os.stat_result) -> bool:
        return False

    def unfinished(self, path: Path, st: os.stat_result) -> bool:
        if not self.finished:
            self.looked_again.append(path)
        return not self.finished

    def hashed(self, seconds: float) -> None:
        self.hash_times.append(seconds)

    def turn(self, path: Path) -> tuple[float | None, float | None]:
        return None, None


@pytest.fixture
def events() -> Iterator[list[tuple[Event, dict[str, Any]]]]:
    seen: list[tuple[Event, dict[str, Any]]] = []

    def listen(event: Event, fields: dict[str, Any]) -> None:
        seen.append((event, fields))

    add_listener(listen)
    yield seen
    remove_listener(listen)


def world(tmp_path: Path, **more: object) -> tuple[Pipeline, Path]:
    root = tmp_path / "data"
    root.mkdir()
    cfg = load_config(write_config(tmp_path / "dedupd.yaml", {
        "index": str(tmp_path / "index.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "watches": [{"path": str(root)}], **more}))
    return Pipeline(cfg, open_store(cfg.index)), root


def test_a_new_image_is_kept_and_its_copy_quarantined(tmp_path: Path, events) -> None:
    pipeline, root = world(tmp_path)
    original = write_image(root / "a.jpg", photo(1, 320, 240))
    intake = Intake()
    first = pipeline.process(original, intake)
    assert first is not None and first.accepted and len(intake.hash_times) == 1
    copy = write_image(root / "sub" / "b.jpg", photo(1, 320, 240), quality=70)
    second = pipeline.process(copy, intake)
    assert second is not None and not second.accepted and second.action == "quarantine"
    assert second.loser == str(copy) and not copy.exists()
    assert second.moved_to is not None and Path(second.moved_to).exists()
    rec = pipeline.store.get_by_path(second.moved_to)
    assert rec is not None and rec.status == QUARANTINED
    assert [e for e, _ in events] == [Event.IMAGE_ACCEPTED, Event.DUPLICATE_QUARANTINED]
    assert pipeline.counts["accepted"] == 1 and pipeline.counts["quarantined"] == 1


def test_a_newcomer_that_replaces_its_copy_is_said_accepted(tmp_path: Path, events) -> None:
    """keep: largest keeps a larger newcomer and quarantines the older copy: both are
    decisions, each said once (the kept newcomer was not said accepted)."""
    pipeline, root = world(tmp_path, policies={"default": {"keep": "largest"}})
    small = write_image(root / "small.jpg", photo(3, 320, 240))
    big = write_image(root / "big.jpg", photo(3, 640, 480))
    intake = Intake()
    pipeline.process(small, intake)
    outcome = pipeline.process(big, intake)
    assert outcome is not None and outcome.accepted and outcome.loser == str(small)
    said = [(e, f["path"]) for e, f in events]
    assert said == [(Event.IMAGE_ACCEPTED, str(small)), (Event.IMAGE_ACCEPTED, str(big)),
                    (Event.DUPLICATE_QUARANTINED, str(small))]
    assert big.exists() and not small.exists()


def test_an_unchanged_file_is_not_hashed_again(tmp_path: Path, events) -> None:
    pipeline, root = world(tmp_path)
    path = write_image(root / "a.jpg", photo(2, 320, 240))
    intake = Intake()
    pipeline.process(path, intake)
    assert pipeline.process(path, intake) is None
    assert len(intake.hash_times) == 1 and len(events) == 1


def test_files_that_are_not_ours_are_not_looked_at(tmp_path: Path) -> None:
    pipeline, root = world(tmp_path)
    outside = write_image(tmp_path / "outside.jpg", photo(3, 64, 48))
    hidden = write_image(root / ".cache" / "x.jpg", photo(3, 64, 48))
    intake = Intake()
    assert pipeline.process(outside, intake) is None
    assert pipeline.process(hidden, intake) is None
    assert pipeline.process(root / "gone.jpg", intake) is None
    assert intake.hash_times == [] and pipeline.store.get_by_path(str(hidden)) is None


def test_bad_input_is_rejected_once_and_moved_where_configured(tmp_path: Path, events
                                                               ) -> None:
    pipeline, root = world(tmp_path, rejected_dir=str(tmp_path / "rejected"))
    corrupt = root / "sub" / "junk.jpg"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    truncated = write_image(root / "cut.png", photo(4, 64, 48))
    truncated.write_bytes(truncated.read_bytes()[:-20])
    intake = Intake()
    pipeline.process(corrupt, intake)
    moved = tmp_path / "rejected" / str(root).lstrip("/") / "sub" / "junk.jpg"
    assert not corrupt.exists() and moved.read_bytes().startswith(b"\xff\xd8")
    pipeline.process(truncated, intake)
    pipeline.process(truncated, intake)  # said once, until it changes
    assert truncated.exists()  # a truncated file may still be being written: left
    said = [(f["kind"], f["quarantine_path"]) for e, f in events
            if e is Event.IMAGE_REJECTED]
    assert said == [("unsupported", str(moved)), ("truncated", None)]
    assert pipeline.store.get_rejection(str(truncated)) is not None


def test_a_file_not_provably_finished_is_left_to_the_intake(tmp_path: Path, events) -> None:
    pipeline, root = world(tmp_path)
    empty = root / "empty.jpg"
    empty.touch()
    intake = Intake(finished=False)
    assert pipeline.process(empty, intake) is None
    assert intake.looked_again == [empty] and events == []
    assert pipeline.store.get_rejection(str(empty)) is None


def test_symlinks_and_fifos_are_rejected_saying_why(tmp_path: Path, events) -> None:
    pipeline, root = world(tmp_path)
    target = write_image(root / "real.jpg", photo(5, 64, 48))
    os.symlink(target, root / "link.jpg")
    os.mkfifo(root / "pipe.jpg")
    intake = Intake()
    for name in ("link.jpg", "pipe.jpg"):
        assert pipeline.process(root / name, intake) is None
    reasons = [f["reason"] for e, f in events if e is Event.IMAGE_REJECTED]
    assert reasons == ["symlink to a file inside the watched roots, not followed "
                       "(follow_symlinks is off)", "a FIFO, not a regular file"]
    assert intake.hash_times == []


def test_one_record_builder_for_ingest_scan_and_repair(tmp_path: Path) -> None:
    """A record rebuilt for a file a crash left in quarantine is the record ingest
    would have stored: same hash, digest, size and signature."""
    pipeline, root = world(tmp_path)
    path = write_image(root / "a.jpg", photo(6, 320, 240))
    pipeline.process(path, Intake())
    stored = pipeline.store.get_by_path(str(path))
    assert stored is not None
    moved = tmp_path / "q" / "a.jpg"
    moved.parent.mkdir()
    os.rename(path, moved)
    rebuilt = pipeline.rehash_entry(QuarantineEntry(
        original_path=str(path), quarantine_path=str(moved), matched_path="/m",
        distance=0, hash="0", policy="default"))
    assert rebuilt is not None and rebuilt.scope == str(root) and rebuilt.path == str(moved)
    same = ("hash", "digest", "file_size", "width", "height", "recipe", "mtime_ns")
    assert {k: getattr(rebuilt, k) for k in same} == {k: getattr(stored, k) for k in same}
    assert rebuilt.signature == pipeline.store.signatures([stored.id])[stored.id]
    hashed = hash_file(moved, pipeline.config.recipe)
    assert record_for(hashed, "s", moved, 7, first_seen=3.0).first_seen == 3.0
    assert pipeline.rehash_entry(QuarantineEntry(
        original_path=str(path), quarantine_path=str(tmp_path / "nothing.jpg"),
        matched_path="/m", distance=0, hash="0", policy="default")) is None


def test_scan_takes_the_daemons_path_and_its_answer_to_what_is_ours(tmp_path: Path) -> None:
    """`dedupd scan` of a directory the daemon ignores (below an ignored name, or below
    a non-recursive root) acts on nothing there; under a root it quarantines a copy
    as the daemon would."""
    import subprocess
    import sys

    root, flat = tmp_path / "data", tmp_path / "flat"
    cfg = write_config(tmp_path / "dedupd.yaml", {
        "index": str(tmp_path / "index.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "watches": [{"path": str(root)}, {"path": str(flat), "recursive": False}]})
    write_image(root / "a.jpg", photo(7, 320, 240))
    hidden = write_image(root / ".cache" / "copy.jpg", photo(7, 320, 240), quality=70)
    write_image(flat / "b.jpg", photo(8, 320, 240))
    below = write_image(flat / "sub" / "copy.jpg", photo(8, 320, 240), quality=70)

    def scan(*paths: Path) -> dict[str, Any]:
        import json

        done = subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg),
                               "scan", "--json", *map(str, paths)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    first = scan(root, flat)
    assert (first["files"], first["indexed"], first["duplicates"]) == (2, 2, 0)
    ignored = scan(root / ".cache", flat / "sub")
    assert (ignored["files"], ignored["duplicates"]) == (0, 0)
    assert hidden.exists() and below.exists()
    copy = write_image(root / "sub" / "copy.jpg", photo(7, 320, 240), quality=70)
    third = scan(root / "sub")
    assert third["quarantined"] == 1 and not copy.exists()
