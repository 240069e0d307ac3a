"""The systemd unit, its hardening, and the installer, checked with systemd's own tools."""

from __future__ import annotations

import json
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
    assert float(match.group(1)) <= 1.0, match.group(0)


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
    assert f"ReadWritePaths={tmp_path}\n" in out  # one tree: renames stay atomic
    assert f"d {tmp_path / 'q'} 0750 dedupd dedupd -" in out  # tmpfiles.d
    assert "sysusers.d/dedupd.conf" in out and "tmpfiles.d/dedupd.conf" in out
    assert "max_user_watches" not in out  # 6 directories: the kernel's limit is enough
    assert "AF_INET" not in out
    assert "dedupd.catalog" in out and "dedupd.service" in out
    pg = installer(tmp_path / "pg", {"index": "postgresql://dedupd@db/dedupd",
                                     "quarantine_dir": str(tmp_path / "q"),
                                     "watches": [{"path": str(roots[0])}]})
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in pg
    assert "IPAddressDeny=\n" in pg
    metrics = installer(tmp_path / "metrics", {
        "quarantine_dir": str(tmp_path / "q"), "watches": [{"path": str(roots[0])}],
        "metrics": {"listen": "127.0.0.1:9468", "textfile": str(tmp_path / "prom" / "d.prom")}})
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in metrics
    assert "IPAddressAllow=localhost" in metrics and "IPAddressDeny=\n" not in metrics
    assert f"ReadWritePaths={tmp_path / 'prom'}\n" in metrics


# ---------------------------------------------------------------- placement and access


def _config(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_one_writable_tree_for_roots_and_quarantine(tmp_path: Path) -> None:
    from dedupd.config import load_config
    from dedupd.deployment import PlacementError, common_parent

    tree = tmp_path / "data"
    cfg = _config(tmp_path, {"quarantine_dir": str(tree / "quarantine"),
                             "watches": [{"path": str(tree / "sets" / "train")},
                                         {"path": str(tree / "incoming")}]})
    assert common_parent(load_config(cfg)) == tree
    apart = _config(tmp_path, {"quarantine_dir": "/var/lib/dedupd/quarantine",
                               "watches": [{"path": "/srv/dedupd/train"}]})
    with pytest.raises(PlacementError, match="share no directory but /, too broad"):
        common_parent(load_config(apart))
    srv = _config(tmp_path, {"quarantine_dir": "/srv/quarantine",
                             "watches": [{"path": "/srv/train"}]})
    with pytest.raises(PlacementError, match="/srv/dedupd/quarantine"):
        common_parent(load_config(srv))


def test_installer_refuses_a_system_directory_as_the_tree(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cfg = dest / "etc" / "dedupd" / "dedupd.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(yaml.safe_dump({"quarantine_dir": "/var/lib/dedupd/quarantine",
                                   "watches": [{"path": "/srv/train"}]}))
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DESTDIR": str(dest), "PYTHON": sys.executable})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "too broad to make writable" in proc.stderr
    assert "paths.conf" not in proc.stdout


def as_nobody(func, *args) -> int:  # type: ignore[no-untyped-def]
    """func(*args) in a forked child running as nobody (root hides permission bugs); its
    exit status. (A fork, not a new interpreter: this one lives under /root.)"""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = func(*args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def shared_dir():
    """A temp dir other users can reach (pytest's own is private to its user)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dedupd-deploy-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_unwritable_root_or_quarantine_is_one_line(shared_dir: Path) -> None:
    tmp_path = shared_dir
    root, quarantine = tmp_path / "root", tmp_path / "q"
    root.mkdir()
    quarantine.mkdir()
    os.chown(quarantine, 65534, 65534)
    cfg = _config(tmp_path, {"index": str(quarantine / "i.sqlite"),
                             "quarantine_dir": str(quarantine),
                             "watches": [{"path": str(root)}]})
    from dedupd.access import check_writable
    from dedupd.config import ConfigError, load_config

    said = tmp_path / "said"

    def check(path: Path) -> int:
        try:
            check_writable(load_config(path))
        except ConfigError as exc:
            said.write_text(str(exc))
            return 78
        return 0

    said.touch()
    said.chmod(0o666)
    assert as_nobody(check, cfg) == 78
    assert said.read_text() == (f"{cfg}: watches[0].path: {root} is not writable by user "
                                f"nobody (grant it: setfacl -m u:nobody:rwX -m "
                                f"d:u:nobody:rwX {root})")
    os.chown(root, 65534, 65534)
    assert as_nobody(check, cfg) == 0
    # log-only roots move nothing: read access is enough
    os.chown(root, 0, 0)
    logonly = _config(tmp_path, {"index": str(quarantine / "i.sqlite"),
                                 "quarantine_dir": str(quarantine),
                                 "policies": {"default": {"action": "log"}},
                                 "watches": [{"path": str(root)}]})
    assert as_nobody(check, logonly) == 0


@needs_root
def test_root_shell_commands_act_as_the_state_owner(shared_dir: Path) -> None:
    from dedupd.access import act_as_state_owner
    from dedupd.config import load_config

    state = shared_dir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    config = load_config(_config(shared_dir, {"index": str(state / "index.sqlite"),
                                              "quarantine_dir": str(state / "q")}))

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            user = act_as_state_owner(config)
            (state / "q").mkdir()
            code = 0 if user == "nobody" and os.geteuid() == 65534 else 3
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert (state / "q").stat().st_uid == 65534
    os.chown(state, 0, 0)  # root's own state: stays root
    assert as_root_unchanged(config)


def as_root_unchanged(config) -> bool:  # type: ignore[no-untyped-def]
    from dedupd.access import act_as_state_owner

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if act_as_state_owner(config) is None and os.geteuid() == 0 else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_reload_waits_for_the_daemons_answer(tmp_path: Path, make_photo) -> None:
    from daemonproc import DaemonProcess, write_config

    root = tmp_path / "root"
    root.mkdir()
    body = {"index": str(tmp_path / "i.sqlite"), "quarantine_dir": str(tmp_path / "q"),
            "watches": [{"path": str(root)}]}
    cfg = write_config(tmp_path / "c.yaml", body)
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "run")}
    daemon = DaemonProcess(cfg, tmp_path / "log", env=env).start()

    def reload() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg), "reload",
                               "--pid", str(daemon.proc.pid)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, **env})

    try:
        ok = reload()
        assert ok.returncode == 0 and "configuration reloaded" in ok.stdout, ok.stderr
        cfg.write_text("watches: [")
        bad = reload()  # refused before any signal
        assert bad.returncode == 78 and "invalid YAML" in bad.stderr
        assert daemon.log().count("configuration reloaded") == 1
        # valid YAML the daemon refuses (an unwritable quarantine): 78, with its reason
        blocked = tmp_path / "file"
        blocked.write_text("")
        write_config(cfg, {**body, "quarantine_dir": str(blocked / "q")})
        refused = reload()
        assert refused.returncode == 78, refused.stdout + refused.stderr
        assert "reload failed, keeping the previous config" in refused.stderr
    finally:
        assert daemon.stop() == 0
    gone = reload()
    assert gone.returncode == 2 and "not a running `dedupd run`" in gone.stderr


def test_reload_never_signals_a_process_that_is_not_dedupd(tmp_path: Path) -> None:
    """SIGHUP ends most programs: `reload --pid` of a stranger must not send it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"index: {tmp_path / 'i.sqlite'}\n")
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        out = subprocess.run([sys.executable, "-m", "dedupd", "--config", str(cfg), "--json",
                              "reload", "--pid", str(stranger.pid)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2
        assert json.loads(out.stdout)["message"].endswith("nothing signalled")
        assert stranger.poll() is None, "the stranger was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_reload_right_after_ready_is_a_reload(tmp_path: Path) -> None:
    """`systemctl start dedupd && systemctl reload dedupd`: SIGHUP may arrive between READY
    and the main loop; its default action would kill the daemon."""
    root = tmp_path / "root"
    root.mkdir()
    cfg = _config(tmp_path, {"index": str(tmp_path / "i.sqlite"),
                             "quarantine_dir": str(tmp_path / "q"),
                             "watches": [{"path": str(root)}]})
    script = ("import os, signal, sys\n"
              "from dedupd.config import load_config\nfrom dedupd.daemon import Daemon\n"
              "d = Daemon(load_config(sys.argv[1]), config_path=sys.argv[1])\n"
              "d.start()\nos.kill(os.getpid(), signal.SIGHUP)\n"
              "ok = d._reload.wait(30)\nd.stop()\nsys.exit(0 if ok else 3)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(cfg)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
