"""Shared fixtures: real images generated on disk, deterministic by seed."""

from __future__ import annotations

import functools
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest

from dedupd.demo import synthetic_photo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def photo(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    """A photo-like BGR image: the demo's generator, smaller by default."""
    return synthetic_photo(seed, width, height)


def seed_recipe(path: Path, size: int = 8) -> int:
    """The seed script, verbatim in spirit: imread colour, BGR2GRAY, default resize."""
    image = cv2.imread(str(path))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    resized = cv2.resize(gray, (size + 1, size))
    diff = resized[:, 1:] > resized[:, :-1]
    return sum(2**i for i, v in enumerate(diff.flatten()) if v)


def write_image(path: Path, img: np.ndarray, quality: int = 92) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, img, params)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


@pytest.fixture
def make_photo(tmp_path: Path):
    """make_photo(name, seed, width, height, quality) -> path of a real encoded image."""

    def make(name: str, seed: int = 0, width: int = 640, height: int = 480,
             quality: int = 92, root: Path | None = None) -> Path:
        return write_image((root or tmp_path) / name, photo(seed, width, height), quality)

    return make


@pytest.fixture
def config_file(tmp_path: Path):
    """config_file(dict) -> path of a YAML config with index/quarantine in tmp_path."""
    import yaml

    def make(body: dict | None = None) -> Path:
        data = {"index": str(tmp_path / "state" / "index.sqlite"),
                "quarantine_dir": str(tmp_path / "state" / "quarantine")}
        data.update(body or {})
        path = tmp_path / "dedupd.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture
def setup(tmp_path: Path):
    """A root, a quarantine dir, an index, and a config writer for a daemon's tests:
    make(**extra) writes the config (extra keys override) and returns
    (config, root, index, quarantine dir)."""
    from daemonproc import write_config

    root = tmp_path / "data"
    root.mkdir()
    state = tmp_path / "state"

    def make(**extra) -> tuple[Path, Path, Path, Path]:
        body = {"index": str(state / "index.sqlite"), "quarantine_dir": str(state / "q"),
                "settle_seconds": 0.5, "watches": [{"path": str(root)}],
                # Re-encoded/resized copies land within 5 bits; distinct photos >= 12 apart.
                "policies": {"default": {"max_distance": 6}}}
        body.update(extra)
        cfg = write_config(tmp_path / "dedupd.yaml", body)
        return cfg, root, state / "index.sqlite", Path(body["quarantine_dir"])

    return make


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the developer's real state or /etc config from tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.delenv("DEDUPD_CONFIG", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                "JOURNAL_STREAM"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A failing test shows the last lines of each daemon it started: a timeout alone says
    what was awaited, the daemon's log says why it did not come."""
    import daemonproc

    report = yield
    if call.when == "setup":
        daemonproc.STARTED_LOGS.clear()
    elif report.failed:
        for log in dict.fromkeys(daemonproc.STARTED_LOGS):
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            report.sections.append((f"daemon log {log.name} (last 40 of {len(lines)} lines)",
                                    "\n".join(lines[-40:])))
    return report


# ---------------------------------------------------------------- PostgreSQL

# The README's test command uses a local server when one answers (CI runs one with trust
# auth); DEDUPD_TEST_PG points elsewhere. Each test gets a fresh database, dropped after.
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


@functools.cache
def pg_admin_url() -> tuple[str | None, str]:
    """(admin DSN, "") if a server answers, else (None, why the PostgreSQL tests skip)."""
    url = os.environ.get("DEDUPD_TEST_PG") or PG_DEFAULT
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install -e '.[test]')"
    try:
        psycopg.connect(url, connect_timeout=3).close()
    except psycopg.Error as exc:
        why = " ".join(str(exc).split())
        if os.environ.get("DEDUPD_TEST_PG"):
            raise RuntimeError(f"DEDUPD_TEST_PG={url} is unreachable: {why}") from None
        return None, (f"no PostgreSQL server at {url} ({why}); start one or set "
                      "DEDUPD_TEST_PG=postgresql://USER@HOST:PORT/DB to run these tests")
    return url, ""


def fresh_database(admin: str) -> tuple[str, Callable[[], None]]:
    """CREATE DATABASE with a unique name on the admin DSN's server: (its DSN, dropper)."""
    import psycopg

    name = f"dedupd_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlsplit(admin)._replace(path=f"/{name}").geturl(), drop


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A DSN of a fresh, empty database on the test server (skips if there is none)."""
    admin, why = pg_admin_url()
    if admin is None:
        pytest.skip(why)
    url, drop = fresh_database(admin)
    try:
        yield url
    finally:
        drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index URL of an empty store, once per backend (store contract tests)."""
    if request.param == "sqlite":
        return str(tmp_path / "i.sqlite")
    return request.getfixturevalue("pg_url")
