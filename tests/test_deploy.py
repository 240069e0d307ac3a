"""The systemd unit, its hardening, and the installer, checked with systemd's own tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "dedupd.service"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt-get install systemd)")


def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's dedupd."""
    exe = Path(sys.executable).with_name("dedupd")
    text = UNIT.read_text().replace("/opt/dedupd/venv/bin/dedupd", str(exe))
    path = tmp_path / "dedupd.service"
    path.write_text(text)
    return path


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(local_unit(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "dedupd.service" not in proc.stderr, proc.stderr  # no warnings about our unit


@needs_analyze
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(local_unit(tmp_path))], capture_output=True, text=True,
                          timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    print(match.group(0))
    assert float(match.group(1)) <= 2.0, match.group(0)


def test_unit_declares_the_service_contract() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ExecReload=",
                 "User=dedupd", "StateDirectory=dedupd", "ConfigurationDirectory=dedupd",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "ProtectHome=yes", "RestrictAddressFamilies=AF_UNIX",
                 "SystemCallFilter=@system-service", "LimitNOFILE="):
        assert line in text, line


def test_runs_with_memory_deny_write_execute(make_photo) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: numpy, OpenCV and watchdog must cope."""
    script = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\n"  # PR_SET_MDWE
        "from dedupd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    photo = make_photo("a.jpg")
    proc = subprocess.run([sys.executable, "-c", script, "hash", str(photo)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert proc.returncode == 0, proc.stderr
    from watchdog.observers import Observer  # noqa: F401 - imported under MDWE below
    proc = subprocess.run([sys.executable, "-c", script.replace(
        "from dedupd.cli import main\n", "from dedupd.watcher import Watcher\n"
        "from watchdog.observers import Observer\no = Observer(); o.start(); o.stop()\n"
        "def main(a): return 0\n"), "x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def installer(tmp_path: Path, config: dict) -> str:
    dest = tmp_path / "dest"
    cfg = dest / "etc" / "dedupd" / "dedupd.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DESTDIR": str(dest), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert not (dest / "opt").exists()  # a dry run writes nothing
    return proc.stdout


def test_installer_dry_run_derives_paths_from_config(tmp_path: Path) -> None:
    roots = [tmp_path / "train", tmp_path / "test"]
    for r in roots:
        (r / "a" / "b").mkdir(parents=True)
    out = installer(tmp_path, {"index": "/var/lib/dedupd/index.sqlite",
                               "quarantine_dir": str(tmp_path / "q"),
                               "watches": [{"path": str(r)} for r in roots]})
    assert f"ReadWritePaths=-{roots[0]} -{roots[1]} -{tmp_path / 'q'}" in out
    assert "AF_INET" not in out
    assert "dedupd.catalog" in out and "dedupd.service" in out
    pg = installer(tmp_path / "pg", {"index": "postgresql://dedupd@db/dedupd",
                                     "quarantine_dir": str(tmp_path / "q"),
                                     "watches": [{"path": str(roots[0])}]})
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in pg
