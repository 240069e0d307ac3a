"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import photo, write_image
from daemonproc import DaemonProcess, write_config

from dedupd.service import Notifier, WatchdogPinger


class NotifySocket:
    """A bound SOCK_DGRAM socket collecting notify datagrams."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address

    def recv(self, timeout: float = 5.0) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg and key in msg:
                return msg
        raise AssertionError(f"no {key} notification within {timeout} s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify(request, tmp_path: Path):
    address = str(tmp_path / "notify.sock") if request.param == "path" else \
        f"@dedupd-test-{uuid.uuid4().hex}"
    s = NotifySocket(address)
    yield s
    s.close()


def test_notifier_sends_each_message(notify, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    n = Notifier()
    assert n.enabled and n.watchdog_interval is None
    n.ready("3 roots")
    assert notify.recv() == {"READY": "1", "STATUS": "3 roots"}
    n.status("queue 5")
    assert notify.recv() == {"STATUS": "queue 5"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    msg = notify.recv()
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) >= before
    n.watchdog()
    assert notify.recv() == {"WATCHDOG": "1"}
    n.stopping()
    assert notify.recv()["STOPPING"] == "1"


def test_without_notify_socket_everything_is_a_noop() -> None:
    n = Notifier()  # conftest removes NOTIFY_SOCKET from the environment
    assert not n.enabled
    n.ready("x")
    n.watchdog()
    pinger = WatchdogPinger(n, lambda: True)
    pinger.start()
    pinger.stop()


def test_watchdog_interval_respects_pid(monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert Notifier().watchdog_interval == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval is None


def test_pings_only_while_healthy(notify, monkeypatch) -> None:
    healthy = threading.Event()
    healthy.set()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    pinger = WatchdogPinger(n, healthy.is_set)
    pinger.start()
    try:
        for _ in range(3):
            assert notify.recv(2.0) == {"WATCHDOG": "1"}
        healthy.clear()  # a wedged worker
        notify.recv(0.3)  # a ping already on its way may still arrive
        assert notify.recv(1.0) is None, "pings must stop while unhealthy"
        healthy.set()
        assert notify.recv(2.0) == {"WATCHDOG": "1"}
    finally:
        pinger.stop()


def test_daemon_notify_sequence(tmp_path: Path) -> None:
    sock = NotifySocket(str(tmp_path / "n.sock"))
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "c.yaml", {
        "index": str(tmp_path / "i.sqlite"), "quarantine_dir": str(tmp_path / "q"),
        "watches": [{"path": str(root)}]})
    daemon = DaemonProcess(cfg, tmp_path / "log", env={
        "NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "1000000"}).start(wait_ready=False)
    try:
        ready = sock.wait_for("READY")
        assert "roots" in ready["STATUS"]
        sock.wait_for("WATCHDOG")
        write_image(root / "a.jpg", photo(1, 320, 240))
        deadline = time.monotonic() + 30
        while "1 indexed, 1 processed, 1 accepted" not in sock.wait_for("STATUS").get(
                "STATUS", ""):
            assert time.monotonic() < deadline, "STATUS never counted the image"
        daemon.signal(signal.SIGHUP)
        assert "MONOTONIC_USEC" in sock.wait_for("RELOADING")
        sock.wait_for("READY")
        daemon.signal(signal.SIGTERM)
        sock.wait_for("STOPPING")
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.kill()
        sock.close()


def test_watchdog_pings_stop_while_a_worker_is_stuck(tmp_path: Path) -> None:
    """A real wedge: another process holds the index's write lock, so the worker that
    must record a new image waits on it. Past stall_seconds the pings stop (systemd
    would restart the service); once the lock goes, pings and work resume."""
    import sqlite3

    sock = NotifySocket(str(tmp_path / "n.sock"))
    root = tmp_path / "root"
    root.mkdir()
    index = tmp_path / "i.sqlite"
    cfg = write_config(tmp_path / "c.yaml", {
        "index": str(index), "quarantine_dir": str(tmp_path / "q"), "stall_seconds": 1,
        "watches": [{"path": str(root)}]})
    daemon = DaemonProcess(cfg, tmp_path / "log", env={
        "NOTIFY_SOCKET": sock.address, "WATCHDOG_USEC": "400000"}).start(wait_ready=False)
    holder = sqlite3.connect(index, isolation_level=None)
    try:
        sock.wait_for("READY")
        sock.wait_for("WATCHDOG")
        holder.execute("BEGIN IMMEDIATE")
        write_image(root / "a.jpg", photo(1, 320, 240))
        last_ping, deadline = time.monotonic(), time.monotonic() + 30
        while time.monotonic() - last_ping < 2.0:  # pings come every 0.2 s while healthy
            assert time.monotonic() < deadline, "pings never stopped while a worker was stuck"
            msg = sock.recv(0.1)
            if msg and "WATCHDOG" in msg:
                last_ping = time.monotonic()
        holder.execute("ROLLBACK")
        sock.wait_for("WATCHDOG", 10)
        while "1 accepted" not in sock.wait_for("STATUS").get("STATUS", ""):
            assert time.monotonic() < deadline + 30, "the image was never recorded"
    finally:
        holder.close()
        daemon.kill()
        sock.close()


def test_a_manager_that_does_not_read_never_blocks_the_caller(notify, monkeypatch) -> None:
    """A datagram socket's queue holds 10 messages by default: past that a blocking send
    waits for the reader. The model test's STATUS= reader paused for 45 s and the
    daemon's main loop (its retries, its store pings) stood still. Sends return at once,
    and the STATUS= that gets through is the newest."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    n = Notifier()
    sender = threading.Thread(target=lambda: [n.status(f"step {i}") for i in range(200)],
                              daemon=True)
    sender.start()
    sender.join(2.0)
    assert not sender.is_alive(), "a send blocked on the unread socket"
    seen = []
    while (msg := notify.recv(0.5)) is not None:
        seen.append(msg["STATUS"])
    assert seen[-1] == "step 199" and len(seen) < 50
    assert n.flush(5)


def test_a_full_notify_socket_does_not_stop_the_other_threads(notify, monkeypatch) -> None:
    """systemd-python's notify() holds the GIL through a blocking send: once the
    manager's queue was full, every thread of the daemon stood still (the model test
    saw a 30 s retry never come). The sender waits without the GIL, then drops."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    address = notify.address
    address = "\0" + address[1:] if address.startswith("@") else address
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):  # fill the receiver's queue
                filler.sendto(b"STATUS=filler", address)
        n = Notifier()
        n.ready("blocked")  # its send now waits for room
        ticks = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # pure Python: needs the GIL
            ticks += 1
        assert ticks > 10_000, ticks
        cpu = time.process_time()
        time.sleep(1.0)  # the send still waits: asleep, not spinning on EAGAIN
        assert time.process_time() - cpu < 0.3
    finally:
        filler.close()
        while notify.recv(0.2) is not None:  # room: the waiting send goes, the thread rests
            pass
