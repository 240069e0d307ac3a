"""dedupd.selection on its own: which paths are ours, under which watch and policy, with
real directories, files and symlinks (no daemon)."""

from __future__ import annotations

import os
from pathlib import Path

from daemonproc import write_config

from dedupd.config import Config, Policy, load_config
from dedupd.selection import (
    is_ignored,
    name_ignored,
    select,
    symlink_allowed,
    symlink_reason,
    walk,
    wanted,
    wanted_test,
)


def test_wanted_filters_by_extension_include_exclude() -> None:
    p = Policy("p", include=("*.jpg", "keep/*"), exclude=("*_thumb.jpg",),
               extensions=("jpg", "png"))
    assert wanted(p, "a/b.JPG".lower())
    assert not wanted(p, "a/b_thumb.jpg")
    assert not wanted(p, "a/b.gif")
    assert wanted(p, "keep/c.png")
    assert not wanted(p, "other/c.png")


def test_wanted_test_agrees_with_wanted() -> None:
    """The set-lookup shortcut for the common policy answers as wanted() does."""
    plain = Policy("plain", extensions=("jpg", "png"))
    narrow = Policy("narrow", include=("keep/*",), extensions=("jpg",))
    for policy in (plain, narrow):
        test = wanted_test(policy)
        for rel in ("a.jpg", "a.JPG", "keep/b.jpg", "c/d.png", "noext", "e.gif", ".jpg",
                    "keep/sub/f.jpg"):
            assert test(rel) == wanted(policy, rel), (policy.name, rel)


def test_ignored_names_by_component_and_by_name() -> None:
    root = Path("/r")
    pats = (".*", "*.tmp")
    assert is_ignored(Path("/r/.cache/a.jpg"), root, pats)
    assert is_ignored(Path("/r/a.jpg.tmp"), root, pats)
    assert not is_ignored(Path("/r/sub/a.jpg"), root, pats)
    assert is_ignored(Path("/elsewhere/a.jpg"), root, pats)  # not below the root
    match = name_ignored(pats)
    assert match(".hidden") and match("x.tmp") and not match("x.jpg")
    assert not name_ignored(())("anything")  # no patterns: nothing ignored


def config(tmp_path: Path, **more: object) -> Config:
    data = tmp_path / "data"
    flat = tmp_path / "flat"
    for d in (data, flat):
        d.mkdir(exist_ok=True)
    body = {"index": str(tmp_path / "index.sqlite"),
            "quarantine_dir": str(tmp_path / "q"),
            "watches": [{"path": str(data)},
                        {"path": str(flat), "recursive": False, "policy": "narrow"}],
            "policies": {"default": {},
                         "narrow": {"include": ["keep_*"], "extensions": ["png"]}},
            **more}
    return load_config(write_config(tmp_path / "dedupd.yaml", body))


def test_select_names_the_watch_and_policy(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    data, flat = tmp_path / "data", tmp_path / "flat"
    got = select(cfg, data / "a" / "b.jpg")
    assert got is not None and got.watch.path == data and got.policy.name == "default"
    assert got.scope == str(data)
    assert select(cfg, flat / "keep_1.png").policy.name == "narrow"  # type: ignore[union-attr]
    not_ours = [
        tmp_path / "outside.jpg",  # under no root
        data / ".cache" / "b.jpg",  # below an ignored name
        data / "b.jpg.tmp",  # an ignored name
        data / "notes.txt",  # not an image extension
        flat / "sub" / "keep_1.png",  # below a non-recursive root
        flat / "other.png",  # not in the policy's include
        flat / "keep_1.jpg",  # not in the policy's extensions
    ]
    assert [p for p in not_ours if select(cfg, p) is not None] == []


def test_symlinks_followed_only_inside_the_roots_and_only_when_asked(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    data = tmp_path / "data"
    (data / "real.jpg").write_bytes(b"x")
    (tmp_path / "out.jpg").write_bytes(b"x")
    links = {"in.jpg": data / "real.jpg", "out.jpg": tmp_path / "out.jpg",
             "dangling.jpg": data / "nothing.jpg", "loop1.jpg": data / "loop2.jpg",
             "loop2.jpg": data / "loop1.jpg"}
    for name, target in links.items():
        os.symlink(target, data / name)
    reasons = {name: symlink_reason(cfg, data / name) for name in links}
    assert reasons == {
        "in.jpg": "symlink to a file inside the watched roots, not followed "
                  "(follow_symlinks is off)",
        "out.jpg": "symlink pointing out of the watched roots (not followed)",
        "dangling.jpg": "dangling symlink (its target does not exist)",
        "loop1.jpg": "symlink loop (not followed)",
        "loop2.jpg": "symlink loop (not followed)"}
    assert not symlink_allowed(cfg, data / "in.jpg")  # follow_symlinks is off
    following = config(tmp_path, follow_symlinks=True)
    assert symlink_allowed(following, data / "in.jpg")
    assert not symlink_allowed(following, data / "out.jpg")


def test_walk_finds_what_select_takes_and_the_default_policy_elsewhere(tmp_path: Path
                                                                       ) -> None:
    """scan and the daemon agree: a walk under a root yields exactly the files select()
    takes (ignored components, non-recursive roots, the root's policy); outside every
    root the default policy's extensions; never a symlink; in name order."""
    cfg = config(tmp_path)
    data, flat, other = tmp_path / "data", tmp_path / "flat", tmp_path / "other"
    files = [data / "b.jpg", data / "a.png", data / "sub" / "c.jpg", data / "x.txt",
             data / ".hidden" / "d.jpg", data / "e.jpg.part", flat / "keep_1.png",
             flat / "drop.png", flat / "sub" / "keep_2.png", other / "f.jpg",
             other / "g.txt"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    os.symlink(data / "b.jpg", data / "link.jpg")
    found = list(walk([data, flat, other], cfg))
    assert found == [data / "a.png", data / "b.jpg", data / "sub" / "c.jpg",
                     flat / "keep_1.png", other / "f.jpg"]
    assert all(select(cfg, p) is not None for p in found if cfg.watch_for(p))
    # A walk that starts below an ignored directory still honours it.
    assert list(walk([data / ".hidden"], cfg)) == []
    # A file named on the command line is yielded as it is (hashed, or said why not).
    assert list(walk([data / "x.txt"], cfg)) == [data / "x.txt"]
