"""Configuration: the example parses, every mistake is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dedupd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config" / "dedupd.yaml")
    assert [w.scope for w in config.watches] == ["cats", "cats", "/srv/dedupd/incoming"]
    assert config.policies["strict"].action == "log"
    assert config.watch_for("/srv/dedupd/datasets/cats/test/a/b.jpg").path == Path(
        "/srv/dedupd/datasets/cats/test")
    assert config.watch_for("/srv/elsewhere/x.jpg") is None


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.index == str(tmp_path / "xdg-state" / "dedupd" / "index.sqlite")
    assert config.policies["default"].max_distance == 4
    assert config.watches == ()


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("watches:\n  - path: /x\n    policy: nope\n", "watches[0].policy", "unknown policy"),
        ("watches:\n  - recursive: true\n", "watches[0].path", "missing"),
        ("policies:\n  default:\n    max_distance: -1\n", "policies.default.max_distance",
         "out of range"),
        ("policies:\n  default:\n    action: shred\n", "policies.default.action", "not one of"),
        ("policies:\n  p:\n    colour: red\n", "policies.p.colour", "unknown key"),
        ("hash:\n  size: 12\n", "hash.size", "not one of"),
        ("hash:\n  algo: phash\n", "hash.algo", "not one of"),
        ("workers: two\n", "workers", "expected an integer"),
        ("settle_seconds: true\n", "settle_seconds", "boolean"),
        ("index: mysql://db\n", "index", "unsupported store"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("watches: {path: /x}\n", "watches", "expected a list"),
        ("ignore: [1]\n", "ignore[0]", "non-empty string"),
        ("quarantine_dir: /srv/d/q\nwatches: [/srv/d]\n", "watches[0].path", "quarantine_dir"),
        ("watches: [/srv/a, /srv/a]\n", "watches[1].path", "watched twice"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert why in message


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("watches:\n  - path: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML: line" in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "d.yaml"
    path.write_text("index: state/i.sqlite\nquarantine_dir: q\nwatches: [data]\n")
    config = load_config(path)
    assert config.index == str(tmp_path / "etc" / "state" / "i.sqlite")
    assert config.watches[0].path == tmp_path / "etc" / "data"
    assert config.watches[0].scope == str(tmp_path / "etc" / "data")


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("settle_seconds: .nan\n", "settle_seconds", "not a finite number"),
        ("stall_seconds: .inf\n", "stall_seconds", "not a finite number"),
        ("circuit_breaker:\n  threshold: .nan\n", "circuit_breaker.threshold", "finite"),
        ("circuit_breaker:\n  window: 10\n  min_decisions: 20\n",
         "circuit_breaker.min_decisions", "more than window"),
        ("workers: 1\nworkers: 2\n", "workers", "duplicate key (line 2)"),
        ("policies:\n  p: {max_distance: 1, max_distance: 2}\n", "max_distance", "duplicate"),
        ("rejected_dir: /srv/d/rejected\nwatches: [/srv/d]\n", "watches[0].path",
         "contains rejected_dir"),
        ("rejected_dir: /srv/d\nwatches: [/srv/d]\n", "watches[0].path", "rejected_dir"),
        ("watches: [/srv/d, /srv/d/sub]\n", "watches[1].path", "overlaps watches[0]"),
        ("watches: [/srv/d/sub, /srv/d]\n", "watches[1].path", "nested roots"),
    ],
)
def test_configs_that_would_misbehave_are_refused(tmp_path: Path, text: str, key: str,
                                                 why: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert why in message


def test_siblings_with_a_common_prefix_are_not_nested(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("watches: [/srv/d, /srv/d2]\nrejected_dir: /srv/d-rejected\n")
    assert len(load_config(path).watches) == 2


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"# caf\xe9 in Latin-1\nworkers: 2\n", "not valid UTF-8: byte 0xe9 at line 1, column 6"),
        ("workers: 2\n".encode("utf-16"), "is UTF-16; save it as UTF-8"),
        (b"workers: 2\n" + b"#" * (1 << 20), "larger than 1 MiB"),
        (b"[" * 5000, "invalid YAML"),
    ],
)
def test_unreadable_text_is_one_line_naming_the_file(tmp_path: Path, raw: bytes,
                                                     why: str) -> None:
    path = tmp_path / "enc.yaml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {why}")
    assert "\n" not in str(info.value)


def test_utf8_with_a_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffworkers: 2\n# caf\u00e9\n".encode())
    assert load_config(path).workers == 2


def test_check_runnable_agrees_with_run(tmp_path: Path) -> None:
    from dedupd.config import check_runnable

    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for watches, why in (([], "watches: nothing to watch"),
                         ([str(tmp_path / "absent")], "does not exist"),
                         ([str(tmp_path / "file")], "is not a directory")):
        path = tmp_path / "c.yaml"
        path.write_text(f"watches: {watches!r}\n".replace("'", '"'))
        with pytest.raises(ConfigError, match=why):
            check_runnable(load_config(path))
    path.write_text(f'watches: ["{tmp_path / "dir"}"]\n')
    check_runnable(load_config(path))
