"""YAML configuration: parsed once into frozen dataclasses, every mistake named by key.

A bad file raises ConfigError whose message is one line: ``FILE: KEY: why``.

Over ~400 lines on purpose: each section's dataclass sits beside the code that checks
its keys, so a new key is one edit in one place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dedupd.hashing import (
    ALGOS,
    DECODES,
    DEFAULT_MAX_PIXELS,
    PIPELINE_VERSION,
    SIZES,
    VERSIONS,
    Recipe,
)
from dedupd.store import StoreError, backend_of

ACTIONS = ("quarantine", "log", "delete")
KEEPS = ("first", "largest")
LOG_MODES = ("auto", "journald", "stderr", "json")
LOG_LEVELS = ("debug", "info", "notice", "warning", "error")
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
DEFAULT_IGNORE = (".*", "*.tmp", "*.part", "*.crdownload", "*.partial", "*~", "*.swp")
SYSTEM_CONFIG = "/etc/dedupd/dedupd.yaml"
MAX_CONFIG_BYTES = 1 << 20  # a configuration is a page of YAML, not a data file


class ConfigError(Exception):
    """One-line, user-facing: which file, which key, what is wrong."""

    def __init__(self, source: str, key: str, why: str) -> None:
        super().__init__(f"{source}: {key}: {why}" if key else f"{source}: {why}")
        self.source, self.key, self.why = source, key, why


@dataclass(frozen=True)
class Policy:
    name: str
    max_distance: int = 4
    action: str = "quarantine"
    keep: str = "first"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    min_width: int = 0
    min_height: int = 0
    # Also check a newcomer as its mirror images and 90/180/270-degree rotations.
    match_flips_rotations: bool = False


@dataclass(frozen=True)
class Watch:
    path: Path
    policy: str = "default"
    recursive: bool = True
    group: str = ""  # roots sharing a group share one dictionary; "" = the root's own path

    @property
    def scope(self) -> str:
        return self.group or str(self.path)


@dataclass(frozen=True)
class CircuitBreaker:
    window: int = 200  # last N decisions of a root
    threshold: float = 0.5  # trip when more than this share would be quarantined/deleted
    min_decisions: int = 20  # don't judge on fewer


@dataclass(frozen=True)
class LogConfig:
    mode: str = "auto"
    level: str = "info"
    summary_interval: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics: an HTTP endpoint and/or node_exporter's textfile collector."""

    listen: tuple[str, int] | None = None  # (host, port)
    textfile: Path | None = None


@dataclass(frozen=True)
class Config:
    source: str
    index: str
    quarantine_dir: Path
    rejected_dir: Path | None = None
    recipe: Recipe = Recipe()
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 0
    queue_size: int = 10000
    settle_seconds: float = 2.0
    unfinished_seconds: float = 60.0
    unresolved_retry_seconds: float = 30.0
    stall_seconds: float = 120.0
    reconcile_interval: float = 3600.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    follow_symlinks: bool = False
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    watches: tuple[Watch, ...] = ()
    policies: Mapping[str, Policy] = field(default_factory=dict)

    def policy_for(self, watch: Watch) -> Policy:
        return self.policies[watch.policy]

    def watch_for(self, path: str | os.PathLike[str]) -> Watch | None:
        """The most specific watch root containing path, or None. (String prefixes of
        the normalised path: asked for every file and every match, and `Path.parents`
        builds a Path per level.)"""
        p = str(Path(path))
        best, best_len = None, -1
        for w in self.watches:
            root = str(w.path)
            inside = p == root or p.startswith(root if root.endswith("/") else root + "/")
            if inside and len(root) > best_len:
                best, best_len = w, len(root)
        return best


# ---------------------------------------------------------------- parsing


class _Reader:
    """Pops typed keys off a mapping and reports leftovers as unknown keys."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        self.source, self.prefix = source, prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, prefix or "(top level)", "must be a mapping")
        self.data = dict(data)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, why: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), why)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if value is None and default is None:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if bool not in kinds and isinstance(value, bool):
            raise self.fail(name, f"expected {_names(kinds)}, got a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.fail(name, f"expected {_names(kinds)}, got {type(value).__name__}")
        return value

    def choice(self, name: str, choices: tuple[Any, ...], default: Any) -> Any:
        value = self.get(name, type(default), default)
        if value not in choices:
            raise self.fail(name, f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def number(self, name: str, kind: type, default: Any, low: float, high: float | None = None):
        value = self.get(name, kind, default)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(name, f"{value} is not a finite number")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(name, f"{value} is out of range (must be {bound})")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(f"{name}[{i}]", "expected a non-empty string")
        return tuple(value)

    def path(self, name: str, default: Path | None, base: Path) -> Path | None:
        value = self.get(name, str, None if default is None else str(default))
        if value is None:
            return None
        if not value:
            raise self.fail(name, "must not be empty")
        if "\0" in value:
            raise self.fail(name, "must not contain a NUL byte")
        return (base / os.path.expanduser(value)).resolve()

    def done(self) -> None:
        if self.data:
            unknown = sorted(map(str, self.data))[0]
            raise self.fail(unknown, "unknown key")


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
             list: "a list", dict: "a mapping"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def default_state_dir() -> Path:
    """Where the embedded store lives when no config names one."""
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "dedupd"


def parse_config(data: Any, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate a loaded YAML document; relative paths resolve against base."""
    base = base or Path.cwd()
    top = _Reader(source, "", data)
    state = default_state_dir()
    index = top.get("index", str, str(state / "index.sqlite"))
    if not index:
        raise top.fail("index", "must not be empty")
    if "\0" in index:
        raise top.fail("index", "must not contain a NUL byte")
    if "://" not in index:
        index = str((base / os.path.expanduser(index)).resolve())
    else:
        try:
            backend_of(index)
        except StoreError as exc:
            raise top.fail("index", str(exc)) from None
    quarantine_dir = top.path("quarantine_dir", state / "quarantine", base)
    rejected_dir = top.path("rejected_dir", None, base)

    hash_r = _Reader(source, "hash", top.get("hash", dict, None))
    try:
        recipe = Recipe(
            algo=hash_r.choice("algo", ALGOS, "dhash"),
            size=hash_r.choice("size", SIZES, 8),
            decode=hash_r.choice("decode", DECODES, "fast"),
            version=hash_r.choice("version", VERSIONS, PIPELINE_VERSION),
        )
    except ValueError as exc:  # pragma: no cover - choices already checked
        raise hash_r.fail("algo", str(exc)) from None
    max_pixels = hash_r.number("max_pixels", int, DEFAULT_MAX_PIXELS, 1)
    hash_r.done()

    cb = _Reader(source, "circuit_breaker", top.get("circuit_breaker", dict, None))
    breaker = CircuitBreaker(
        window=cb.number("window", int, 200, 1),
        threshold=cb.number("threshold", float, 0.5, 0.0, 1.0),
        min_decisions=cb.number("min_decisions", int, 20, 1),
    )
    cb.done()
    if breaker.min_decisions > breaker.window:
        raise cb.fail("min_decisions", f"{breaker.min_decisions} is more than window "
                      f"({breaker.window}): the breaker could never judge")

    lg = _Reader(source, "log", top.get("log", dict, None))
    log = LogConfig(
        mode=lg.choice("mode", LOG_MODES, "auto"),
        level=lg.choice("level", LOG_LEVELS, "info"),
        summary_interval=lg.number("summary_interval", float, 60.0, 1.0),
    )
    lg.done()

    metrics = _parse_metrics(source, top.get("metrics", dict, None), base)

    policies = _parse_policies(source, top.get("policies", dict, None))
    watches = _parse_watches(source, top.get("watches", list, None), policies, base)

    config = Config(
        source=source,
        index=index,
        quarantine_dir=quarantine_dir,  # type: ignore[arg-type]
        rejected_dir=rejected_dir,
        recipe=recipe,
        max_pixels=max_pixels,
        workers=top.number("workers", int, 0, 0, 256),
        queue_size=top.number("queue_size", int, 10000, 1),
        settle_seconds=top.number("settle_seconds", float, 2.0, 0.0),
        unfinished_seconds=top.number("unfinished_seconds", float, 60.0, 0.0),
        unresolved_retry_seconds=top.number("unresolved_retry_seconds", float, 30.0, 0.0),
        stall_seconds=top.number("stall_seconds", float, 120.0, 1.0),
        reconcile_interval=top.number("reconcile_interval", float, 3600.0, 0.0),
        ignore=top.strings("ignore", DEFAULT_IGNORE),
        follow_symlinks=top.get("follow_symlinks", bool, False),
        circuit_breaker=breaker,
        log=log,
        metrics=metrics,
        watches=watches,
        policies=policies,
    )
    top.done()
    for i, w in enumerate(watches):
        for name, kept in (("quarantine_dir", config.quarantine_dir),
                           ("rejected_dir", config.rejected_dir)):
            if kept is not None and _inside(kept, w.path):
                raise ConfigError(source, f"watches[{i}].path", f"{w.path} contains {name} "
                                  f"{kept}; keep them apart (its files would be watched)")
        for j, other in enumerate(watches[:i]):
            if _inside(w.path, other.path) or _inside(other.path, w.path):
                raise ConfigError(source, f"watches[{i}].path", f"{w.path} overlaps "
                                  f"watches[{j}] ({other.path}); nested roots would see every "
                                  "file twice: watch the outer one, or exclude the inner one "
                                  "with its policy")
    return config


def _parse_metrics(source: str, raw: Any, base: Path) -> MetricsConfig:
    r = _Reader(source, "metrics", raw)
    listen = r.get("listen", str, None)
    textfile = r.path("textfile", None, base)
    r.done()
    if listen is None:
        return MetricsConfig(None, textfile)
    try:
        return MetricsConfig(parse_listen(listen), textfile)
    except ValueError as exc:
        raise r.fail("listen", str(exc)) from None


def parse_listen(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port); ValueError says what is wrong.
    any_port allows port 0 (the kernel picks one)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9468)")
    return host, int(port)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_runnable(config: Config) -> None:
    """What `run` needs beyond a well-formed file: something to watch, and every root an
    existing directory (checked on disk, so `validate` refuses what `run` would)."""
    if not config.watches:
        raise ConfigError(config.source, "watches", "nothing to watch (add at least one root)")
    for i, w in enumerate(config.watches):
        if not w.path.exists():
            raise ConfigError(config.source, f"watches[{i}].path", f"{w.path} does not exist")
        if not w.path.is_dir():
            raise ConfigError(config.source, f"watches[{i}].path",
                              f"{w.path} is not a directory")


def _parse_policies(source: str, raw: Any) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    raw = {"default": {}} if raw is None else raw
    if "default" not in raw:
        raw = {"default": {}, **raw}
    for name, body in raw.items():
        r = _Reader(source, f"policies.{name}", body)
        exts = r.strings("extensions", DEFAULT_EXTENSIONS)
        policies[str(name)] = Policy(
            name=str(name),
            max_distance=r.number("max_distance", int, 4, 0, 64),
            action=r.choice("action", ACTIONS, "quarantine"),
            keep=r.choice("keep", KEEPS, "first"),
            include=r.strings("include", ("*",)),
            exclude=r.strings("exclude", ()),
            extensions=tuple(e.lower().lstrip(".") for e in exts),
            min_width=r.number("min_width", int, 0, 0),
            min_height=r.number("min_height", int, 0, 0),
            match_flips_rotations=r.get("match_flips_rotations", bool, False),
        )
        r.done()
    return policies


def _parse_watches(
    source: str, raw: Any, policies: Mapping[str, Policy], base: Path
) -> tuple[Watch, ...]:
    watches = []
    seen: set[Path] = set()
    for i, body in enumerate(raw or []):
        if isinstance(body, str):
            body = {"path": body}
        r = _Reader(source, f"watches[{i}]", body)
        if "path" not in r.data:
            raise r.fail("path", "missing (every watch needs a path)")
        path = r.path("path", None, base)
        assert path is not None
        if path in seen:
            raise r.fail("path", f"{path} is watched twice")
        seen.add(path)
        policy = r.get("policy", str, "default")
        if policy not in policies:
            raise r.fail("policy", f"unknown policy {policy!r} (defined: "
                         f"{', '.join(sorted(policies))})")
        watches.append(Watch(path=path, policy=policy, recursive=r.get("recursive", bool, True),
                             group=r.get("group", str, "")))
        r.done()
    return tuple(watches)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load PATH; with None, the system config if present, else built-in defaults."""
    if path is None:
        path = os.environ.get("DEDUPD_CONFIG") or (
            SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None
        )
    if path is None:
        return parse_config({}, "<defaults>")
    source = str(path)
    data = _parse_yaml(source, _read_text(source))
    return parse_config(data, source, Path(source).resolve().parent)


def _read_text(source: str) -> str:
    """The file as text: at most MAX_CONFIG_BYTES of UTF-8, every failure one line."""
    try:
        with open(source, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(source, "", exc.strerror or str(exc)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, "", f"larger than {MAX_CONFIG_BYTES >> 20} MiB; is this "
                          "the configuration file?")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(source, "", "is UTF-16; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(source, "", f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at line "
                          f"{line}, column {column}; save it as UTF-8") from None


def _parse_yaml(source: str, text: str) -> Any:
    """safe_load, refusing duplicate keys (YAML says they are an error; PyYAML keeps the
    last one silently, so a second `watches:` would drop the first)."""
    import yaml  # only with a file to read: keeps `dedupd hash` start-up short

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    break
                if duplicate:
                    raise ConfigError(source, str(key), f"duplicate key (line "
                                      f"{key_node.start_mark.line + 1}); YAML keeps only one")
            return super().construct_mapping(node, deep)

    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
