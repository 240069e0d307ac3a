"""A Debian with systemd as PID 1, booted with systemd-nspawn, for the system tests.

The root file system is debootstrapped once and cached under /var/tmp, keyed by the suite
and package list (about two minutes, from the mirror this host's apt uses). Each boot runs
it with --volatile=overlay: every change lives in a tmpfs and the cache stays clean.

On hosts whose PID 1 is not systemd (no machined, no D-Bus) nspawn needs --register=no
--keep-unit, and commands enter the container with nsenter instead of machinectl. pip
inside uses the host's pip configuration, CA bundle and the local package folders that
configuration names (bind-mounted read-only), so it reaches the same index.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
# systemd + dbus to boot; the rest is what deploy/install.sh would otherwise apt-get.
PACKAGES = ("acl", "dbus", "gcc", "libsystemd-dev", "pkg-config", "procps", "python3",
            "python3-dev", "python3-venv", "systemd")
CACHE = Path(os.environ.get("DEDUPD_SYSTEM_CACHE", "/var/tmp"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """The tier cannot run here; the message is the one-line skip reason."""


def apt_mirror() -> str | None:
    """The Debian mirror apt on this host already uses (never a hard-coded host)."""
    uris: list[str] = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris += re.findall(r"^URIs:\s*(\S+)", src.read_text(), re.M)
    for lst in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        if lst.exists():
            uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", lst.read_text(), re.M)
    uris = [u for u in uris if "security" not in u]
    return uris[0] if uris else None


def ensure_host_tools() -> None:
    """systemd-nspawn and debootstrap, installed with apt when missing (root only)."""
    if shutil.which("systemd-nspawn") and shutil.which("debootstrap"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "systemd-container", "debootstrap"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise Unavailable("cannot install systemd-container and debootstrap with apt: "
                              + (proc.stderr.strip().splitlines() or ["?"])[-1])


def rootfs() -> Path:
    """The cached Debian root, debootstrapped on first use."""
    key = hashlib.sha256(f"{SUITE} {','.join(PACKAGES)}".encode()).hexdigest()[:12]
    root = CACHE / f"dedupd-system-root-{key}"
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    mirror = apt_mirror()
    if mirror is None:
        raise Unavailable("no Debian mirror in this host's apt sources")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log = CACHE / f"dedupd-debootstrap-{key}.log"
    with open(log, "w") as out:
        proc = subprocess.run(["debootstrap", f"--include={','.join(PACKAGES)}", SUITE,
                               str(partial), mirror], stdout=out, stderr=subprocess.STDOUT,
                              timeout=1500)
    if proc.returncode != 0:
        raise Unavailable(f"debootstrap from {mirror} failed (no network to the mirror?), "
                          f"see {log}")
    partial.rename(root)
    return root


def pip_binds() -> list[str]:
    """Read-only binds giving pip inside the host's configuration and local indexes."""
    binds = []
    for f in ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs/ca-certificates.crt"):
        if os.path.exists(f):
            binds.append(f"--bind-ro={f}")
    proc = subprocess.run(["pip", "config", "list"], capture_output=True, text=True)
    for d in sorted(set(re.findall(r"(?:file://)?(/[^' ]+)", proc.stdout))):
        d = re.sub(r"/simple/?$", "", d)
        if os.path.isdir(d) and not d.startswith("/etc"):
            binds.append(f"--bind-ro={d}")
    return binds


class Machine:
    """One booted container. `run()` executes a command inside, as root or as a user."""

    def __init__(self, root: Path, source: Path, name: str = "dedupd-system") -> None:
        self.root, self.source, self.name = root, source, name
        self.workdir = Path(tempfile.mkdtemp(prefix="dedupd-system-"))
        self.console = self.workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None

    def boot(self, timeout: float = 120) -> None:
        """Copy the project's files in (as a clone would have them) and boot."""
        src = self.workdir / "dedupd"
        files = subprocess.run(["git", "-C", str(self.source), "ls-files", "-co",
                                "--exclude-standard", "-z"], capture_output=True,
                               check=True).stdout.split(b"\0")
        for name in filter(None, files):
            rel = os.fsdecode(name)
            if (self.source / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.source / rel, src / rel)
        with open(self.console, "wb") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--volatile=overlay", "-b",
                 "-M", self.name, "--register=no", "--keep-unit",
                 f"--bind={src}:/root/dedupd", *pip_binds()],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.leader() is None:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nspawn did not boot: {self.console.read_text()[-500:]}")
            time.sleep(0.1)
        while self.run("test", "-S", "/run/systemd/private", check=False).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("systemd inside did not come up")
            time.sleep(0.1)
        state = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"system state {state!r} after boot")

    def leader(self) -> int | None:
        """The container's PID 1 as the host sees it (nspawn's child, running systemd)."""
        if self.nspawn is None:
            return None
        try:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except OSError:
            pass
        return None

    def run(self, *cmd: str, user: str | None = None, check: bool = True,
            input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """cmd inside the container (all its namespaces, a clean environment)."""
        leader = self.leader()
        if leader is None:
            raise RuntimeError("the container is not running")
        as_user = ["runuser", "-u", user, "--"] if user else []
        proc = subprocess.run(
            ["nsenter", "-t", str(leader), "-a", "--", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", "TERM=dumb", "HOME=/root", *as_user, *cmd],
            input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kw)  # type: ignore[arg-type]

    def poweroff(self, timeout: float = 60) -> None:
        if self.nspawn is None:
            return
        if self.leader() is not None:
            self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            self.nspawn.wait(timeout)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()  # only the nspawn this harness started
            self.nspawn.wait()
        self.nspawn = None
        shutil.rmtree(self.workdir, ignore_errors=True)
