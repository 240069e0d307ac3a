"""The system tier: a booted Debian with systemd as PID 1, dedupd installed in it exactly
as the README's "Running under systemd" says. Needs root; skips with one line otherwise.
Run on its own (`./dev test tests/system`; `.ci/run` does it after the unit tests)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from machine import Machine, Unavailable, ensure_host_tools, rootfs

SOURCE = Path(__file__).resolve().parents[2]
DATA = "/srv/dedupd"  # the README's example layout
CONFIG = f"""\
index: /var/lib/dedupd/index.sqlite
quarantine_dir: {DATA}/quarantine
rejected_dir: {DATA}/rejected
stall_seconds: 5
settle_seconds: 0.5
policies:
  default:
    max_distance: 6
watches:
  - path: {DATA}/datasets/cats/train
    group: cats
  - path: {DATA}/incoming
"""


@pytest.fixture(scope="session")
def machine() -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.skip("system tier: needs root (debootstrap, systemd-nspawn)")
    try:
        ensure_host_tools()
        root = rootfs()
    except Unavailable as exc:
        pytest.skip(f"system tier: {exc}")
    m = Machine(root, SOURCE)
    started = time.monotonic()
    try:
        m.boot()
        print(f"booted in {time.monotonic() - started:.1f} s")
        yield m
    finally:
        if os.environ.get("DEDUPD_SYSTEM_KEEP"):  # for a post-mortem: nsenter -t PID -a
            print(f"kept running: nsenter -t {m.leader()} -a bash")
        else:
            m.poweroff()


def wait_until(check, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} "
                                 f"(last: {value!r})")
        time.sleep(interval)
